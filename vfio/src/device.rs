//! [`VfioPciDevice`]: a host PCI function passed through to the guest.
//!
//! The device is a cheap, clonable handle over shared state: the root port calls it as a
//! [`PciDevice`], the guest's trapped BAR accesses reach the same state through the bus, and the
//! VMM keeps a handle to place BARs, wait on the request/error eventfds and [`release`] it.
//!
//! [`release`]: VfioPciDevice::release

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use log::Level;
use rvmm_devices::{log_throttled, LogThrottle};
use rvmm_pci::PciDevice;
use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_PCI_ROM_REGION_INDEX,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{DeviceBackend, VfioBackend};
use crate::bars::{BarInfo, NUM_BARS};
use crate::config::{ConfigError, VirtualConfig, COMMAND_BUS_MASTER, COMMAND_IO, COMMAND_MEMORY};
use crate::container::{Container, ContainerError};
use crate::host::{HostDevice, HostError, Sysfs};
use crate::interrupts::{InterruptError, InterruptRouter, Interrupts, IrqMode, VectorWant};
use crate::layout::{bar_layout, Area, Mmappable};
use crate::mmio::{AddressSpace, BarMap, GuestMmio, TrapHandler};
use crate::msi::MsiWrite;
use crate::msix::MsixWrite;
use rvmm_devices::sync::MutexExt;

const ROM_INDEX: usize = VFIO_PCI_ROM_REGION_INDEX as usize;

/// How the VMM wires the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The GSI of the INTx line the guest sees for this device (after the root port's swizzle),
    /// or `None` to offer no INTx (the guest must use MSI/MSI-X).
    pub intx_gsi: Option<u32>,
}

/// Errors of opening a passthrough device.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A host-side problem with a known fix.
    #[error(transparent)]
    Host(HostError),
    /// The device cannot be opened through the container.
    #[error("cannot open host device {name} through the VM's VFIO container")]
    Container {
        /// The device.
        name: String,
        /// The error.
        #[source]
        source: ContainerError,
    },
    /// The config space cannot be virtualized.
    #[error("cannot virtualize the config space of host device {name}")]
    Config {
        /// The device.
        name: String,
        /// The error.
        #[source]
        source: ConfigError,
    },
    /// The INTx line cannot be wired.
    #[error("cannot wire the interrupts of host device {name}")]
    Interrupts {
        /// The device.
        name: String,
        /// The error.
        #[source]
        source: InterruptError,
    },
}

/// Result of device operations.
pub type Result<T> = std::result::Result<T, DeviceError>;

pub(crate) struct Inner {
    pub(crate) name: Arc<str>,
    pub(crate) backend: Option<Box<dyn DeviceBackend>>,
    pub(crate) router: Arc<dyn InterruptRouter>,
    pub(crate) mmio: Arc<dyn GuestMmio>,
    pub(crate) config: VirtualConfig,
    pub(crate) irqs: Interrupts,
    pub(crate) maps: Vec<BarMap>,
    pub(crate) self_ref: Weak<Mutex<Inner>>,
    pub(crate) notify_irqs: Vec<u32>,
    /// BAR addresses programmed as firmware would ([`VfioPciDevice::set_bar_address`]),
    /// programmed again after a reset for a reboot.
    pub(crate) firmware_bars: Vec<(usize, u64)>,
    /// Limits what a guest can make us log by programming interrupts and BARs.
    pub(crate) throttle: LogThrottle,
    /// Signalled when the guest clears uncorrectable error status in the emulated AER
    /// capability ([`VfioPciDevice::aer_cleared_event`]).
    pub(crate) aer_cleared: Option<Arc<EventFd>>,
}

/// A passthrough PCI function.
#[derive(Clone)]
pub struct VfioPciDevice {
    inner: Arc<Mutex<Inner>>,
    name: Arc<str>,
    request: Option<Arc<EventFd>>,
    error: Option<Arc<EventFd>>,
    aer_cleared: Option<Arc<EventFd>>,
}

/// The sizes of the six BAR regions and of the ROM region the kernel reports (0: none).
pub(crate) fn region_sizes(backend: &dyn DeviceBackend) -> ([u64; NUM_BARS], u64) {
    let mut bar_sizes = [0u64; NUM_BARS];
    for (i, size) in bar_sizes.iter_mut().enumerate() {
        *size = backend.region(i as u32).map_or(0, |r| r.size);
    }
    let rom_size = backend
        .region(VFIO_PCI_ROM_REGION_INDEX)
        .map_or(0, |r| r.size);
    (bar_sizes, rom_size)
}

/// How each BAR (and the ROM, always trapped) is mapped into the guest.
fn bar_maps(backend: &dyn DeviceBackend, vconfig: &VirtualConfig, name: &str) -> Vec<BarMap> {
    let page_size = rvmm_devices::host::page_size();
    let mut maps: Vec<BarMap> = vconfig
        .bars()
        .infos()
        .map(|info| bar_map(backend, vconfig, info, page_size, name))
        .collect();
    if let Some((size, _)) = vconfig.bars().rom_size() {
        maps.push(BarMap::new(
            ROM_INDEX,
            AddressSpace::Mmio,
            size,
            page_size,
            Vec::new(),
            vec![Area::new(0, size)],
        ));
    }
    maps
}

/// Clears the decode and bus-master bits of the device's command register.
pub(crate) fn quiesce(backend: &dyn DeviceBackend, name: &str) {
    let mut cmd = [0u8; 2];
    let result = backend
        .read(VFIO_PCI_CONFIG_REGION_INDEX, 4, &mut cmd)
        .and_then(|()| {
            let value =
                u16::from_le_bytes(cmd) & !(COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER);
            backend.write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &value.to_le_bytes())
        });
    if let Err(e) = result {
        log::warn!("{name}: cannot clear the command register: {e}");
    }
}

fn notify_eventfd(backend: &dyn DeviceBackend, index: u32, name: &str) -> Option<Arc<EventFd>> {
    if backend.irq_count(index) == 0 {
        return None;
    }
    let fd = match EventFd::new(EFD_NONBLOCK) {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("{name}: cannot create an eventfd for VFIO IRQ index {index}: {e}");
            return None;
        }
    };
    match backend.enable_irq(index, &[&fd]) {
        Ok(()) => Some(Arc::new(fd)),
        Err(e) => {
            log::warn!("{name}: cannot enable VFIO IRQ index {index}: {e}");
            None
        }
    }
}

/// Builds the placement record of BAR `info`: mmaps its directly mappable areas.
fn bar_map(
    backend: &dyn DeviceBackend,
    config: &VirtualConfig,
    info: &BarInfo,
    page_size: u64,
    name: &str,
) -> BarMap {
    let index = info.index;
    if !info.kind.is_memory() {
        return BarMap::new(
            index,
            AddressSpace::Pio,
            info.size,
            page_size,
            Vec::new(),
            vec![Area::new(0, info.size)],
        );
    }
    let mmappable = backend
        .region(index as u32)
        .map_or(Mmappable::None, |r| r.mmappable);
    let holes = config
        .msix()
        .map(|m| m.info().holes_in(index))
        .unwrap_or_default();
    let mut layout = bar_layout(info.host_size, page_size, &mmappable, &holes);
    let mut direct = Vec::new();
    for area in &layout.direct {
        match backend.mmap(index as u32, area.offset, area.size) {
            Ok(mapping) => direct.push((*area, mapping)),
            Err(e) => {
                log::warn!(
                    "{name}: cannot mmap BAR {index} {:#x}+{:#x} ({e}); trapping the BAR",
                    area.offset,
                    area.size
                );
                direct.clear();
                layout = bar_layout(info.host_size, page_size, &Mmappable::None, &holes);
                break;
            }
        }
    }
    let mut trapped = layout.trapped;
    if info.size > info.host_size {
        trapped.push(Area::new(info.host_size, info.size - info.host_size));
    }
    BarMap::new(
        index,
        AddressSpace::Mmio,
        info.size,
        page_size,
        direct,
        trapped,
    )
}

impl VfioPciDevice {
    /// Opens `host` (checked by [`Sysfs::prepare`]) through the VM's `container` (vfio-pci
    /// resets a device when its first descriptor opens) and builds the device model. `group` is
    /// the device's VFIO group descriptor when the caller opened it (an unprivileged VMM); `None`
    /// opens `/dev/vfio/<group>`. Errors with a known host-side cause come back as
    /// [`DeviceError::Host`].
    pub fn open(
        container: &Arc<Container>,
        sysfs: &Sysfs,
        host: &HostDevice,
        group: Option<OwnedFd>,
        config: DeviceConfig,
        router: Arc<dyn InterruptRouter>,
        mmio: Arc<dyn GuestMmio>,
    ) -> Result<Self> {
        let name = host.bdf.to_string();
        let (device, attachment) = container
            .open_device_with_group(&host.sysfs_path, group)
            .map_err(|e| match sysfs.explain_open_error(host, &e) {
                Some(explained) => DeviceError::Host(explained),
                None => DeviceError::Container {
                    name: name.clone(),
                    source: e,
                },
            })?;
        let backend = VfioBackend::new(device, attachment);
        Self::with_backend(name, Box::new(backend), config, router, mmio)
    }

    /// Builds the device model over any backend (the VFIO one, or a fake in tests): reads the
    /// device's config space, clears decode and bus master, mmaps what can be mapped, wires INTx
    /// and the request/error interrupts. No reset of its own: vfio-pci has reset the device as
    /// its descriptor opened (a function reset costs 100 ms and more: the PCIe spec's wait
    /// after an FLR), and one through `VFIO_DEVICE_RESET` could only repeat it.
    pub fn with_backend(
        name: String,
        backend: Box<dyn DeviceBackend>,
        config: DeviceConfig,
        router: Arc<dyn InterruptRouter>,
        mmio: Arc<dyn GuestMmio>,
    ) -> Result<Self> {
        let name: Arc<str> = name.into();
        let (bar_sizes, rom_size) = region_sizes(&*backend);
        let interrupts_err = |source| DeviceError::Interrupts {
            name: name.to_string(),
            source,
        };
        let mut irqs = Interrupts::new(config.intx_gsi, &*backend).map_err(interrupts_err)?;
        let vconfig = VirtualConfig::new(&*backend, bar_sizes, rom_size, irqs.has_intx()).map_err(
            |source| DeviceError::Config {
                name: name.to_string(),
                source,
            },
        )?;
        quiesce(&*backend, &name);

        let maps = bar_maps(&*backend, &vconfig, &name);
        let request = notify_eventfd(&*backend, VFIO_PCI_REQ_IRQ_INDEX, &name);
        let error = notify_eventfd(&*backend, VFIO_PCI_ERR_IRQ_INDEX, &name);
        let notify_irqs = [
            (request.is_some(), VFIO_PCI_REQ_IRQ_INDEX),
            (error.is_some(), VFIO_PCI_ERR_IRQ_INDEX),
        ]
        .into_iter()
        .filter_map(|(armed, index)| armed.then_some(index))
        .collect();
        if irqs.has_intx() {
            irqs.switch(IrqMode::Intx, &*backend, &*router)
                .map_err(interrupts_err)?;
        }

        let aer_cleared = vconfig.aer().and_then(|_| {
            EventFd::new(EFD_NONBLOCK)
                .map_err(|e| log::warn!("{name}: no AER recovery notifier: {e}"))
                .ok()
                .map(Arc::new)
        });
        let inner = Arc::new_cyclic(|weak| {
            Mutex::new(Inner {
                name: name.clone(),
                backend: Some(backend),
                router,
                mmio,
                config: vconfig,
                irqs,
                maps,
                self_ref: weak.clone(),
                notify_irqs,
                firmware_bars: Vec::new(),
                throttle: LogThrottle::default(),
                aer_cleared: aer_cleared.clone(),
            })
        });
        Ok(Self {
            inner,
            name,
            request,
            error,
            aer_cleared,
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    /// The host address of the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The implemented BARs, for the VMM's address allocator.
    pub fn bars(&self) -> Vec<BarInfo> {
        self.lock().config.bars().infos().copied().collect()
    }

    /// The guest-visible size of the expansion ROM, if the device has one.
    pub fn rom_size(&self) -> Option<u64> {
        self.lock().config.bars().rom_size().map(|(size, _)| size)
    }

    /// Programs BAR `index` to `gpa`, as firmware would before the guest boots (the BAR is
    /// placed in the guest once the guest enables decoding). Returns false for an
    /// unimplemented BAR.
    pub fn set_bar_address(&self, index: usize, gpa: u64) -> bool {
        let mut inner = self.lock();
        let done = inner.config.bars_mut().set_address(index, gpa);
        if done {
            inner.firmware_bars.retain(|&(i, _)| i != index);
            inner.firmware_bars.push((index, gpa));
        }
        inner.sync_bars();
        done
    }

    /// Where each placed BAR is in the guest: (region index, guest address); the ROM is index 6.
    pub fn placed_bars(&self) -> Vec<(usize, u64)> {
        self.lock()
            .maps
            .iter()
            .filter_map(|m| m.mapped_at().map(|gpa| (m.bar(), gpa)))
            .collect()
    }

    /// The live interrupt mode.
    pub fn irq_mode(&self) -> IrqMode {
        self.lock().irqs.mode()
    }

    /// How many MSI/MSI-X vectors are live on the host: every MSI vector once MSI is enabled,
    /// MSI-X vectors as the guest unmasks them.
    pub fn live_vectors(&self) -> usize {
        self.lock().irqs.live_vectors()
    }

    /// Signalled when the host asks for the device back (VFIO request IRQ): the VMM should
    /// remove it from the guest (surprise removal if need be) and release it.
    pub fn request_event(&self) -> Option<&EventFd> {
        self.request.as_deref()
    }

    /// Signalled when the device reports an uncorrectable error (VFIO error IRQ).
    pub fn error_event(&self) -> Option<&EventFd> {
        self.error.as_deref()
    }

    /// Signalled when the guest clears uncorrectable error status bits in the device's
    /// emulated AER capability: how the VMM learns that the guest's error recovery finished.
    /// `None` without an AER capability.
    pub fn aer_cleared_event(&self) -> Option<&EventFd> {
        self.aer_cleared.as_deref()
    }

    /// Releases the device: removes its BARs from the guest, tears down irqfds, routes and VFIO
    /// interrupts, clears bus master and decode and closes its fds (vfio-pci resets the device
    /// as its last descriptor closes; a reset through `VFIO_DEVICE_RESET` before would only
    /// repeat it, 100 ms and more each). Idempotent; also done when the last handle is dropped.
    /// Config reads afterwards return all ones.
    ///
    /// The slow part (closing the descriptor: vfio-pci's reset, the group leaving the container
    /// and guest RAM unpinned with the last one) runs after the device's lock is let go: a vCPU
    /// that touches the device meanwhile (a guest driver tearing down a device it just lost)
    /// finds it gone at once instead of waiting for the host.
    pub fn release(&self) {
        let detached = self.lock().detach();
        if let Some(detached) = detached {
            detached.close();
        }
    }

    /// Whether [`VfioPciDevice::release`] ran.
    pub fn is_released(&self) -> bool {
        self.lock().backend.is_none()
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        let mut guard = self.lock();
        let inner = &mut *guard;
        match inner.backend.as_deref() {
            Some(backend) => inner.config.read(reg, backend, &inner.irqs),
            None => u32::MAX,
        }
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.lock().config_write(reg, offset, data);
    }

    fn reset(&mut self) {
        self.lock().guest_reset("secondary bus reset");
    }
}

impl Inner {
    /// A reset the guest asked for (`why`): the function reset through VFIO, the virtual config
    /// space as after a reset. Failures are logged (the guest sees a device that did not reset).
    fn guest_reset(&mut self, why: &str) {
        if self.backend.is_none() {
            return;
        }
        // Throttled: a guest can reset its device as often as it likes.
        match self.reset_function() {
            Ok(()) => log_throttled!(
                self.throttle,
                Level::Info,
                "{}: {why} by the guest (VFIO_DEVICE_RESET)",
                self.name
            ),
            Err(e) => log_throttled!(
                self.throttle,
                Level::Error,
                "{}: {why} by the guest failed: {e}",
                self.name
            ),
        }
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if self.backend.is_none() {
            return;
        }
        // Remove BARs from the guest before the device stops decoding them, so a vCPU never
        // reaches a disabled BAR through a stale memory slot.
        if let Some(new) = self.config.command_after(reg, offset, data) {
            let disabled = self.config.command() & !new;
            for map in &mut self.maps {
                let bit = match map.space() {
                    AddressSpace::Mmio => COMMAND_MEMORY,
                    AddressSpace::Pio => COMMAND_IO,
                };
                if disabled & bit != 0 {
                    map.unplace(&*self.mmio);
                }
            }
        }
        let Some(backend) = self.backend.as_deref() else {
            return;
        };
        let w = self.config.write(reg, offset, data, backend);
        if w.flr {
            self.guest_reset("function level reset");
            return;
        }
        if w.aer_cleared {
            if let Some(e) = &self.aer_cleared {
                if let Err(e) = e.write(1) {
                    log::warn!(
                        "{}: cannot signal the AER recovery notifier: {e}",
                        self.name
                    );
                }
            }
        }
        if w.msi != MsiWrite::None || w.msix != MsixWrite::None {
            self.sync_interrupts(w.msix);
        }
        if w.command || w.bars {
            self.sync_bars();
        }
    }

    /// Brings the host interrupt mode and vectors in line with the guest's MSI/MSI-X state.
    fn sync_interrupts(&mut self, touched: MsixWrite) {
        let Some(backend) = self.backend.as_deref() else {
            return;
        };
        let want = match (self.config.msix(), self.config.msi()) {
            (Some(msix), _) if msix.enabled() => IrqMode::Msix(u32::from(msix.vectors())),
            (_, Some(msi)) if msi.enabled() => IrqMode::Msi(msi.vectors()),
            _ if self.irqs.has_intx() => IrqMode::Intx,
            _ => IrqMode::Off,
        };
        let before = self.irqs.mode();
        if let Err(e) = self.irqs.switch(want, backend, &*self.router) {
            log_throttled!(
                self.throttle,
                Level::Error,
                "{}: cannot switch interrupts to {want:?}: {e}",
                self.name
            );
        }
        let switched = before != self.irqs.mode();
        match self.irqs.mode() {
            IrqMode::Msix(n) => match touched {
                MsixWrite::Vector(v) if !switched => self.update_msix_vector(v),
                MsixWrite::None if !switched => {}
                _ => (0..n).for_each(|v| self.update_msix_vector(v as u16)),
            },
            IrqMode::Msi(n) => {
                for v in 0..n {
                    let Some(msi) = self.config.msi() else {
                        return;
                    };
                    let want = VectorWant {
                        masked: msi.masked(v),
                        msg: msi.message(v),
                    };
                    if let Err(e) =
                        self.irqs
                            .update_vector(v as usize, want, backend, &*self.router)
                    {
                        log_throttled!(
                            self.throttle,
                            Level::Error,
                            "{}: MSI vector {v}: {e}",
                            self.name
                        );
                    }
                }
            }
            IrqMode::Intx | IrqMode::Off => {}
        }
    }

    fn update_msix_vector(&mut self, v: u16) {
        let (Some(msix), Some(backend)) = (self.config.msix(), self.backend.as_deref()) else {
            return;
        };
        let want = VectorWant {
            masked: msix.masked(v),
            msg: msix.message(v),
        };
        if let Err(e) = self
            .irqs
            .update_vector(usize::from(v), want, backend, &*self.router)
        {
            log_throttled!(
                self.throttle,
                Level::Error,
                "{}: MSI-X vector {v}: {e}",
                self.name
            );
        }
    }

    /// Places every BAR where the guest programmed it, or removes it when decoding is off.
    pub(crate) fn sync_bars(&mut self) {
        if self.backend.is_none() {
            return;
        }
        let command = self.config.command();
        let bars = self.config.bars();
        let wanted: Vec<Option<u64>> = self
            .maps
            .iter()
            .map(|map| {
                if map.bar() == ROM_INDEX {
                    return bars.rom_address().filter(|_| command & COMMAND_MEMORY != 0);
                }
                let info = bars.info(map.bar())?;
                let decode = if info.kind.is_memory() {
                    COMMAND_MEMORY
                } else {
                    COMMAND_IO
                };
                bars.address(map.bar())
                    .filter(|&a| a != 0 && command & decode != 0)
            })
            .collect();
        for (map, gpa) in self.maps.iter_mut().zip(wanted) {
            if let Err(e) = map.place(gpa, &*self.mmio, &self.self_ref) {
                log_throttled!(self.throttle, Level::Error, "{}: {e}", self.name);
            }
        }
    }

    fn host_size(&self, bar: usize) -> u64 {
        if bar == ROM_INDEX {
            return self.config.bars().rom_size().map_or(0, |(_, host)| host);
        }
        self.config.bars().info(bar).map_or(0, |i| i.host_size)
    }

    fn in_region(&self, bar: usize, offset: u64, len: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.host_size(bar))
    }

    /// Takes the device out of the guest (BARs, interrupts) and hands back what still has to be
    /// closed; `None` when it is released already.
    fn detach(&mut self) -> Option<Detached> {
        let backend = self.backend.take()?;
        for map in &mut self.maps {
            map.unplace(&*self.mmio);
        }
        self.irqs.teardown(&*backend, &*self.router);
        for index in self.notify_irqs.drain(..) {
            if let Err(e) = backend.disable_irq(index) {
                log::warn!("{}: cannot disable VFIO IRQ index {index}: {e}", self.name);
            }
        }
        Some(Detached {
            name: self.name.clone(),
            maps: std::mem::take(&mut self.maps),
            backend,
        })
    }

    fn release(&mut self) {
        if let Some(detached) = self.detach() {
            detached.close();
        }
    }
}

/// A device out of the guest whose descriptors are still open ([`Inner::detach`]).
struct Detached {
    name: Arc<str>,
    maps: Vec<BarMap>,
    backend: Box<dyn DeviceBackend>,
}

impl Detached {
    /// Clears bus master and decode, unmaps the BARs from our address space and then closes the
    /// device (vfio-pci resets it; the last device of a group takes the group out of the
    /// container).
    fn close(self) {
        quiesce(&*self.backend, &self.name);
        drop(self.maps);
        drop(self.backend);
        log::info!("{}: released", self.name);
    }
}

impl TrapHandler for Inner {
    fn trap_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(backend) = self.backend.as_deref() else {
            return;
        };
        if let Some(msix) = self.config.msix() {
            let info = msix.info();
            if usize::from(info.table_bar) == bar && info.table_area().contains(offset) {
                msix.read_table(offset - info.table_offset, data);
                return;
            }
            if usize::from(info.pba_bar) == bar && info.pba_area().contains(offset) {
                let irqs = &self.irqs;
                msix.read_pba(offset - info.pba_offset, data, |v| {
                    irqs.pending(usize::from(v))
                });
                return;
            }
        }
        if !self.in_region(bar, offset, data.len()) {
            return;
        }
        if let Err(e) = backend.read(bar as u32, offset, data) {
            data.fill(0);
            log::debug!("{}: BAR {bar} read at {offset:#x} failed: {e}", self.name);
        }
    }

    fn trap_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.backend.is_none() || bar == ROM_INDEX {
            return;
        }
        if let Some(msix) = self.config.msix_mut() {
            let info = *msix.info();
            if usize::from(info.table_bar) == bar && info.table_area().contains(offset) {
                let w = msix.write_table(offset - info.table_offset, data);
                if let (MsixWrite::Vector(v), IrqMode::Msix(_)) = (w, self.irqs.mode()) {
                    self.update_msix_vector(v);
                }
                return;
            }
            if usize::from(info.pba_bar) == bar && info.pba_area().contains(offset) {
                return;
            }
        }
        if !self.in_region(bar, offset, data.len()) {
            return;
        }
        if let Some(backend) = self.backend.as_deref() {
            if let Err(e) = backend.write(bar as u32, offset, data) {
                log::debug!("{}: BAR {bar} write at {offset:#x} failed: {e}", self.name);
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
