//! Interrupt wiring of a passthrough device: VFIO signals an eventfd per vector, KVM injects it
//! through an irqfd bound to a GSI whose route is the vector's MSI message.
//!
//! Masking a vector removes its irqfd, so the host interrupt stays counted in the eventfd
//! (that is the pending bit); unmasking re-adds the irqfd and KVM delivers what was pending.
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

#[derive(Debug)]
struct Vector {
    event: EventFd,
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
        })
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
                let index = if matches!(want, IrqMode::Msi(_)) {
                    VFIO_PCI_MSI_IRQ_INDEX
                } else {
                    VFIO_PCI_MSIX_IRQ_INDEX
                };
                let count = count.min(backend.irq_count(index));
                if count == 0 {
                    return Ok(());
                }
                let mut vectors = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    vectors.push(Vector {
                        event: eventfd()?,
                        gsi: None,
                        route: None,
                        irqfd: false,
                    });
                }
                let fds: Vec<&EventFd> = vectors.iter().map(|v| &v.event).collect();
                backend
                    .enable_irq(index, &fds)
                    .map_err(vfio("enable", index))?;
                self.vectors = vectors;
                self.mode = if index == VFIO_PCI_MSI_IRQ_INDEX {
                    IrqMode::Msi(count)
                } else {
                    IrqMode::Msix(count)
                };
                Ok(())
            }
        }
    }

    /// Brings vector `v` to `want`: unmasked vectors get a GSI, the route and an irqfd; masked
    /// ones lose the irqfd but keep GSI and route. A vector past the live ones is ignored.
    pub fn update_vector(
        &mut self,
        v: usize,
        want: VectorWant,
        router_: &dyn InterruptRouter,
    ) -> Result<()> {
        let Some(vector) = self.vectors.get_mut(v) else {
            return Ok(());
        };
        if want.masked {
            if let (true, Some(gsi)) = (vector.irqfd, vector.gsi) {
                router_
                    .remove_irqfd(gsi, &vector.event)
                    .map_err(router("remove an irqfd", gsi))?;
                vector.irqfd = false;
            }
            return Ok(());
        }
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
                .add_irqfd(gsi, &vector.event)
                .map_err(router("add an irqfd", gsi))?;
            vector.irqfd = true;
        }
        Ok(())
    }

    /// Whether vector `v` has an undelivered interrupt (only possible while masked).
    pub fn pending(&self, v: usize) -> bool {
        self.vectors
            .get(v)
            .is_some_and(|vector| !vector.irqfd && is_signalled(&vector.event))
    }

    /// Signals vector `v` as the host would (tests).
    #[cfg(test)]
    pub(crate) fn signal_vector(&self, v: usize) {
        if let Some(vector) = self.vectors.get(v) {
            vector.event.write(1).unwrap();
        }
    }

    /// Tears down the live mode: irqfds and routes removed, GSIs freed, VFIO interrupts disabled.
    /// Errors are logged: teardown must run to the end.
    pub fn teardown(&mut self, backend: &dyn DeviceBackend, router_: &dyn InterruptRouter) {
        let mut freed = Vec::with_capacity(self.vectors.len());
        for vector in self.vectors.drain(..) {
            if let Some(gsi) = vector.gsi {
                if vector.irqfd {
                    if let Err(e) = router_.remove_irqfd(gsi, &vector.event) {
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
mod tests {
    use super::*;
    use crate::testing::{FakeDevice, FakeRouter, RouterOp};

    fn msg(data: u32) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000,
            data,
        }
    }

    fn unmasked(data: u32) -> VectorWant {
        VectorWant {
            masked: false,
            msg: msg(data),
        }
    }

    #[test]
    fn unmasked_vector_gets_route_and_irqfd() {
        let dev = FakeDevice::new();
        let r = FakeRouter::default();
        let mut irqs = Interrupts::new(None, &dev).unwrap();
        irqs.switch(IrqMode::Msix(4), &dev, &r).unwrap();
        irqs.update_vector(1, unmasked(0x21), &r).unwrap();
        assert_eq!(
            r.ops(),
            [
                RouterOp::Allocate(0),
                RouterOp::Route(0, msg(0x21)),
                RouterOp::AddIrqfd(0)
            ]
        );
        assert_eq!(dev.enabled_irq(VFIO_PCI_MSIX_IRQ_INDEX), Some(4));
    }

    #[test]
    fn masking_removes_the_irqfd_and_keeps_the_gsi() {
        let dev = FakeDevice::new();
        let r = FakeRouter::default();
        let mut irqs = Interrupts::new(None, &dev).unwrap();
        irqs.switch(IrqMode::Msix(4), &dev, &r).unwrap();
        irqs.update_vector(0, unmasked(0x21), &r).unwrap();
        irqs.update_vector(
            0,
            VectorWant {
                masked: true,
                msg: msg(0x21),
            },
            &r,
        )
        .unwrap();
        assert_eq!(r.ops().last(), Some(&RouterOp::RemoveIrqfd(0)));
        assert_eq!(r.live_gsis(), [0]);
    }

    #[test]
    fn masked_vector_reports_pending_after_a_signal() {
        let dev = FakeDevice::new();
        let r = FakeRouter::default();
        let mut irqs = Interrupts::new(None, &dev).unwrap();
        irqs.switch(IrqMode::Msix(2), &dev, &r).unwrap();
        assert!(!irqs.pending(1));
        irqs.vectors[1].event.write(1).unwrap();
        assert!(irqs.pending(1));
        assert!(!irqs.pending(7));
    }

    #[test]
    fn unchanged_message_is_not_rerouted_on_unmask() {
        let dev = FakeDevice::new();
        let r = FakeRouter::default();
        let mut irqs = Interrupts::new(None, &dev).unwrap();
        irqs.switch(IrqMode::Msi(1), &dev, &r).unwrap();
        irqs.update_vector(0, unmasked(1), &r).unwrap();
        irqs.update_vector(
            0,
            VectorWant {
                masked: true,
                msg: msg(1),
            },
            &r,
        )
        .unwrap();
        irqs.update_vector(0, unmasked(1), &r).unwrap();
        let routes = r
            .ops()
            .iter()
            .filter(|op| matches!(op, RouterOp::Route(..)))
            .count();
        assert_eq!(routes, 1);
    }

    #[test]
    fn switching_modes_frees_every_gsi_and_disables_vfio() {
        let dev = FakeDevice::new();
        let r = FakeRouter::default();
        let mut irqs = Interrupts::new(Some(10), &dev).unwrap();
        irqs.switch(IrqMode::Msix(4), &dev, &r).unwrap();
        irqs.update_vector(0, unmasked(1), &r).unwrap();
        irqs.update_vector(3, unmasked(2), &r).unwrap();
        irqs.switch(IrqMode::Intx, &dev, &r).unwrap();
        assert!(r.live_gsis().is_empty());
        assert_eq!(dev.enabled_irq(VFIO_PCI_MSIX_IRQ_INDEX), None);
        assert_eq!(dev.enabled_irq(VFIO_PCI_INTX_IRQ_INDEX), Some(1));
        assert_eq!(r.ops().last(), Some(&RouterOp::AddResampleIrqfd(10)));
    }

    #[test]
    fn vector_count_is_capped_by_vfio() {
        let dev = FakeDevice::new();
        let r = FakeRouter::default();
        let mut irqs = Interrupts::new(None, &dev).unwrap();
        irqs.switch(IrqMode::Msix(5000), &dev, &r).unwrap();
        assert_eq!(
            irqs.mode(),
            IrqMode::Msix(dev.irq_count(VFIO_PCI_MSIX_IRQ_INDEX))
        );
    }

    #[test]
    fn switching_to_the_same_capped_mode_keeps_the_vectors() {
        let dev = FakeDevice::new();
        let r = FakeRouter::default();
        let mut irqs = Interrupts::new(None, &dev).unwrap();
        irqs.switch(IrqMode::Msix(2048), &dev, &r).unwrap();
        irqs.update_vector(0, unmasked(1), &r).unwrap();
        irqs.switch(IrqMode::Msix(2048), &dev, &r).unwrap();
        assert_eq!(r.live_gsis(), [0]);
        assert!(!r.ops().contains(&RouterOp::Free(0)));
    }

    #[test]
    fn intx_without_a_line_stays_off() {
        let dev = FakeDevice::new();
        let r = FakeRouter::default();
        let mut irqs = Interrupts::new(None, &dev).unwrap();
        irqs.switch(IrqMode::Intx, &dev, &r).unwrap();
        assert_eq!(irqs.mode(), IrqMode::Off);
    }

    #[test]
    fn failed_gsi_allocation_is_reported() {
        let dev = FakeDevice::new();
        let r = FakeRouter::default();
        r.fail_allocation();
        let mut irqs = Interrupts::new(None, &dev).unwrap();
        irqs.switch(IrqMode::Msix(1), &dev, &r).unwrap();
        let err = irqs.update_vector(0, unmasked(1), &r).unwrap_err();
        assert!(matches!(err, InterruptError::Router { gsi: 0, .. }));
    }
}
