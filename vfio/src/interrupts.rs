//! Interrupt wiring of a passthrough device: VFIO signals an eventfd per vector, KVM injects it
//! through an irqfd bound to a GSI whose route is the vector's MSI message.
//!
//! Masking a vector removes its irqfd, so the host interrupt stays counted in the eventfd
//! (that is the pending bit); unmasking re-adds the irqfd and KVM delivers what was pending.
//!
//! MSI-X vectors are made live as the guest unmasks them, not all at enable: a device with 2048
//! table entries whose driver uses 9 costs 9 eventfds and host interrupts, not 2048. Enabling
//! MSI-X makes vector 0 live (the device must be in MSI-X mode on the host as soon as the guest
//! enables it). A later vector is added to the enabled index where VFIO allows it (no
//! `VFIO_IRQ_INFO_NORESIZE`: kernels from 6.5 with dynamic MSI-X); elsewhere the index is
//! disabled and enabled again with more vectors, and every vector that was in use is signalled
//! once after, so that an interrupt the device raised in between is not lost (a spurious one
//! is harmless to drivers, a lost one hangs them). MSI vectors (at most 32) are all live at
//! enable.
//! INTx uses an irqfd with a resamplefd so VFIO re-arms the level-triggered line on guest EOI.

use std::io;
use std::os::fd::AsRawFd;

use rvmm_pci::MsiMessage;
use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::DeviceBackend;

/// GSI routing and irqfd registration, implemented by the VMM over KVM.
pub trait InterruptRouter: Send + Sync {
    /// Allocates an unused GSI for an MSI route.
    fn allocate_gsi(&self) -> io::Result<u32>;
    /// Sets (or replaces) the MSI route of `gsi`.
    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> io::Result<()>;
    /// Drops the route of `gsi` and returns it to the allocator.
    fn free_gsi(&self, gsi: u32);
    /// Drops the routes of `gsis` and returns them to the allocator, committing the routing
    /// table once (freeing every vector of a device is one change, not one per vector).
    fn free_gsis(&self, gsis: &[u32]) {
        for &gsi in gsis {
            self.free_gsi(gsi);
        }
    }
    /// Makes signals on `fd` inject `gsi` (`KVM_IRQFD`).
    fn add_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()>;
    /// Makes signals on `fd` assert the level-triggered `gsi`; KVM signals `resample` when the
    /// guest acknowledges it (`KVM_IRQFD_FLAG_RESAMPLE`).
    fn add_resample_irqfd(&self, gsi: u32, fd: &EventFd, resample: &EventFd) -> io::Result<()>;
    /// Removes the irqfd `fd` of `gsi` (`KVM_IRQFD_FLAG_DEASSIGN`).
    fn remove_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()>;
}

/// Errors of interrupt setup.
#[derive(Debug, Error)]
pub enum InterruptError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// VFIO refused an interrupt configuration.
    #[error("VFIO cannot {action} interrupt index {index}")]
    Vfio {
        /// What was attempted.
        action: &'static str,
        /// VFIO IRQ index.
        index: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The VMM's router refused an operation.
    #[error("interrupt router cannot {action} for GSI {gsi}")]
    Router {
        /// What was attempted.
        action: &'static str,
        /// The GSI concerned (0 when allocating).
        gsi: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Result of interrupt operations.
pub type Result<T> = std::result::Result<T, InterruptError>;

/// Which interrupt mechanism is live on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqMode {
    /// No interrupts.
    Off,
    /// The legacy INTx line.
    Intx,
    /// MSI with this many vectors.
    Msi(u32),
    /// MSI-X with this many vectors.
    Msix(u32),
}

/// What the guest wants of one MSI/MSI-X vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VectorWant {
    /// Masked (by its own bit, the function mask, or because it is unconfigured).
    pub masked: bool,
    /// Its message.
    pub msg: MsiMessage,
}

#[derive(Debug, Default)]
struct Vector {
    /// Its eventfd, once the vector is live on the host.
    event: Option<EventFd>,
    gsi: Option<u32>,
    route: Option<MsiMessage>,
    irqfd: bool,
}

#[derive(Debug)]
struct Intx {
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
}

/// The host-side interrupt state of one device.
#[derive(Debug)]
pub struct Interrupts {
    mode: IrqMode,
    vectors: Vec<Vector>,
    intx: Option<Intx>,
    /// Whether MSI-X vectors can be added while MSI-X is enabled.
    msix_resizable: bool,
}

fn eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)
}

fn vfio(action: &'static str, index: u32) -> impl FnOnce(io::Error) -> InterruptError {
    move |source| InterruptError::Vfio {
        action,
        index,
        source,
    }
}

fn router(action: &'static str, gsi: u32) -> impl FnOnce(io::Error) -> InterruptError {
    move |source| InterruptError::Router {
        action,
        gsi,
        source,
    }
}

/// Whether `fd` has a non-zero counter, without consuming it.
fn is_signalled(fd: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd; a zero timeout never blocks.
    let ret = unsafe { libc::poll(&mut pfd, 1, 0) };
    ret == 1 && pfd.revents & libc::POLLIN != 0
}

impl Interrupts {
    /// Creates the state. INTx is available when the VMM gave the device a line (`intx_gsi`)
    /// and the device has one.
    pub fn new(intx_gsi: Option<u32>, backend: &dyn DeviceBackend) -> Result<Self> {
        let intx = match intx_gsi {
            Some(gsi) if backend.irq_count(VFIO_PCI_INTX_IRQ_INDEX) > 0 => Some(Intx {
                gsi,
                trigger: eventfd()?,
                resample: eventfd()?,
            }),
            _ => None,
        };
        Ok(Self {
            mode: IrqMode::Off,
            vectors: Vec::new(),
            intx,
            msix_resizable: false,
        })
    }

    /// How many vectors are live on the host (have an eventfd and a host interrupt).
    pub fn live_vectors(&self) -> usize {
        self.vectors.iter().filter(|v| v.event.is_some()).count()
    }

    /// The live mode.
    pub fn mode(&self) -> IrqMode {
        self.mode
    }

    /// Whether the device can use INTx.
    pub fn has_intx(&self) -> bool {
        self.intx.is_some()
    }

    /// What `want` amounts to on this device: vector counts capped by what VFIO offers, INTx
    /// without a line (or no vectors at all) meaning off.
    fn effective(&self, want: IrqMode, backend: &dyn DeviceBackend) -> IrqMode {
        match want {
            IrqMode::Intx if self.intx.is_none() => IrqMode::Off,
            IrqMode::Msi(n) => match n.min(backend.irq_count(VFIO_PCI_MSI_IRQ_INDEX)) {
                0 => IrqMode::Off,
                n => IrqMode::Msi(n),
            },
            IrqMode::Msix(n) => match n.min(backend.irq_count(VFIO_PCI_MSIX_IRQ_INDEX)) {
                0 => IrqMode::Off,
                n => IrqMode::Msix(n),
            },
            other => other,
        }
    }

    /// Switches to `want`, tearing down the current mode first. Switching to INTx without a line
    /// switches interrupts off. On error the mode is [`IrqMode::Off`].
    pub fn switch(
        &mut self,
        want: IrqMode,
        backend: &dyn DeviceBackend,
        router_: &dyn InterruptRouter,
    ) -> Result<()> {
        let want = self.effective(want, backend);
        if want == self.mode {
            return Ok(());
        }
        self.teardown(backend, router_);
        match want {
            IrqMode::Off => Ok(()),
            IrqMode::Intx => {
                let Some(intx) = &self.intx else {
                    return Ok(());
                };
                backend
                    .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, &[&intx.trigger])
                    .map_err(vfio("enable", VFIO_PCI_INTX_IRQ_INDEX))?;
                let wired = backend
                    .set_intx_resample(&intx.resample)
                    .map_err(vfio("set the resample eventfd of", VFIO_PCI_INTX_IRQ_INDEX))
                    .and_then(|()| {
                        router_
                            .add_resample_irqfd(intx.gsi, &intx.trigger, &intx.resample)
                            .map_err(router("add a resample irqfd", intx.gsi))
                    });
                if let Err(e) = wired {
                    let _ = backend.disable_irq(VFIO_PCI_INTX_IRQ_INDEX);
                    return Err(e);
                }
                self.mode = IrqMode::Intx;
                Ok(())
            }
            IrqMode::Msi(count) | IrqMode::Msix(count) => {
                let msi = matches!(want, IrqMode::Msi(_));
                let index = if msi {
                    VFIO_PCI_MSI_IRQ_INDEX
                } else {
                    VFIO_PCI_MSIX_IRQ_INDEX
                };
                let count = count.min(backend.irq_count(index));
                if count == 0 {
                    return Ok(());
                }
                let mut vectors: Vec<Vector> = std::iter::repeat_with(Vector::default)
                    .take(count as usize)
                    .collect();
                // MSI: every vector now. MSI-X: vector 0 now, the others as they are unmasked.
                let live = if msi { vectors.len() } else { 1 };
                for v in vectors.iter_mut().take(live) {
                    v.event = Some(eventfd()?);
                }
                let fds: Vec<&EventFd> = vectors.iter().filter_map(|v| v.event.as_ref()).collect();
                backend
                    .enable_irq(index, &fds)
                    .map_err(vfio("enable", index))?;
                self.vectors = vectors;
                self.msix_resizable = !msi && backend.irq_resizable(index);
                self.mode = if msi {
                    IrqMode::Msi(count)
                } else {
                    IrqMode::Msix(count)
                };
                Ok(())
            }
        }
    }

    /// Makes MSI-X vector `v` live on the host: added to the enabled index, or (where VFIO
    /// cannot resize it) the index enabled again with vectors `0..=v`, each vector that was in
    /// use then signalled once so that nothing raised in between is lost.
    fn make_live(&mut self, v: usize, backend: &dyn DeviceBackend) -> Result<()> {
        let index = VFIO_PCI_MSIX_IRQ_INDEX;
        if self
            .vectors
            .get(v)
            .is_none_or(|vector| vector.event.is_some())
        {
            return Ok(());
        }
        let vector_number = u32::try_from(v).unwrap_or(u32::MAX);
        if self.msix_resizable {
            let event = eventfd()?;
            backend
                .set_irq_trigger(index, vector_number, &event)
                .map_err(vfio("add a vector to", index))?;
            if let Some(vector) = self.vectors.get_mut(v) {
                vector.event = Some(event);
            }
            return Ok(());
        }
        let in_use: Vec<usize> = (0..self.vectors.len())
            .filter(|&i| self.vectors.get(i).is_some_and(|x| x.irqfd))
            .collect();
        for vector in self.vectors.iter_mut().take(v + 1) {
            if vector.event.is_none() {
                vector.event = Some(eventfd()?);
            }
        }
        let fds: Vec<&EventFd> = self
            .vectors
            .iter()
            .take(v + 1)
            .filter_map(|x| x.event.as_ref())
            .collect();
        let enabled = backend
            .disable_irq(index)
            .and_then(|()| backend.enable_irq(index, &fds))
            .map_err(vfio("enable more vectors of", index));
        if let Err(e) = enabled {
            // Nothing is live on the host any more: say so, so that nothing is signalled.
            for vector in &mut self.vectors {
                vector.event = None;
            }
            return Err(e);
        }
        for i in in_use {
            if let Some(event) = self.vectors.get(i).and_then(|x| x.event.as_ref()) {
                let _ = event.write(1);
            }
        }
        Ok(())
    }

    /// Brings vector `v` to `want`: unmasked vectors get a GSI, the route and an irqfd; masked
    /// ones lose the irqfd but keep GSI and route. A vector past the live ones is ignored.
    pub fn update_vector(
        &mut self,
        v: usize,
        want: VectorWant,
        backend: &dyn DeviceBackend,
        router_: &dyn InterruptRouter,
    ) -> Result<()> {
        if want.masked {
            let Some(vector) = self.vectors.get_mut(v) else {
                return Ok(());
            };
            if let (true, Some(gsi), Some(event)) = (vector.irqfd, vector.gsi, &vector.event) {
                router_
                    .remove_irqfd(gsi, event)
                    .map_err(router("remove an irqfd", gsi))?;
                vector.irqfd = false;
            }
            return Ok(());
        }
        if matches!(self.mode, IrqMode::Msix(_)) {
            self.make_live(v, backend)?;
        }
        let Some(vector) = self.vectors.get_mut(v) else {
            return Ok(());
        };
        let Some(event) = vector.event.as_ref() else {
            return Ok(());
        };
        let gsi = match vector.gsi {
            Some(gsi) => gsi,
            None => {
                let gsi = router_
                    .allocate_gsi()
                    .map_err(router("allocate a GSI", 0))?;
                vector.gsi = Some(gsi);
                gsi
            }
        };
        if vector.route != Some(want.msg) {
            router_
                .set_msi_route(gsi, want.msg)
                .map_err(router("set the MSI route", gsi))?;
            vector.route = Some(want.msg);
        }
        if !vector.irqfd {
            router_
                .add_irqfd(gsi, event)
                .map_err(router("add an irqfd", gsi))?;
            vector.irqfd = true;
        }
        Ok(())
    }

    /// Whether vector `v` has an undelivered interrupt (only possible while masked).
    pub fn pending(&self, v: usize) -> bool {
        self.vectors
            .get(v)
            .is_some_and(|vector| !vector.irqfd && vector.event.as_ref().is_some_and(is_signalled))
    }

    /// Signals vector `v` as the host would (tests).
    #[cfg(test)]
    pub(crate) fn signal_vector(&self, v: usize) {
        if let Some(event) = self.vectors.get(v).and_then(|x| x.event.as_ref()) {
            event.write(1).unwrap();
        }
    }

    /// Tears down the live mode: irqfds and routes removed, GSIs freed, VFIO interrupts disabled.
    /// Errors are logged: teardown must run to the end.
    pub fn teardown(&mut self, backend: &dyn DeviceBackend, router_: &dyn InterruptRouter) {
        let mut freed = Vec::with_capacity(self.vectors.len());
        for vector in self.vectors.drain(..) {
            if let Some(gsi) = vector.gsi {
                if let (true, Some(event)) = (vector.irqfd, &vector.event) {
                    if let Err(e) = router_.remove_irqfd(gsi, event) {
                        log::warn!("cannot remove irqfd of GSI {gsi}: {e}");
                    }
                }
                freed.push(gsi);
            }
        }
        router_.free_gsis(&freed);
        let index = match self.mode {
            IrqMode::Off => return,
            IrqMode::Intx => {
                if let Some(intx) = &self.intx {
                    if let Err(e) = router_.remove_irqfd(intx.gsi, &intx.trigger) {
                        log::warn!("cannot remove INTx irqfd of GSI {}: {e}", intx.gsi);
                    }
                }
                VFIO_PCI_INTX_IRQ_INDEX
            }
            IrqMode::Msi(_) => VFIO_PCI_MSI_IRQ_INDEX,
            IrqMode::Msix(_) => VFIO_PCI_MSIX_IRQ_INDEX,
        };
        if let Err(e) = backend.disable_irq(index) {
            log::warn!("cannot disable VFIO interrupt index {index}: {e}");
        }
        self.mode = IrqMode::Off;
    }
}

#[cfg(test)]
#[path = "interrupts_tests.rs"]
mod tests;
