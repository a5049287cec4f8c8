//! GSI allocation and the KVM GSI routing table: the legacy IRQ chip routes plus one MSI route per
//! passthrough vector. Implements the VFIO device model's [`InterruptRouter`].

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use rvmm_devices::sync::MutexExt;
use rvmm_pci::MsiMessage;
use rvmm_vfio::interrupts::InterruptRouter;
use vmm_sys_util::eventfd::EventFd;

/// IOAPIC pins; GSIs below this are the legacy lines.
pub const IOAPIC_PINS: u32 = 24;
/// ISA IRQs also wired to the PICs.
const PIC_IRQS: u32 = 16;
/// Most GSIs KVM accepts in a routing table (KVM_MAX_IRQ_ROUTES is 4096 on x86).
pub const MAX_GSI: u32 = 4095;

struct State {
    msi_routes: BTreeMap<u32, MsiMessage>,
    free: Vec<u32>,
    next: u32,
}

/// Allocates MSI GSIs above the IOAPIC pins and keeps KVM's routing table in step.
pub struct GsiRouter {
    vm_fd: Arc<VmFd>,
    state: Mutex<State>,
}

impl GsiRouter {
    /// Creates the router; nothing is sent to KVM until the first MSI route.
    pub fn new(vm_fd: Arc<VmFd>) -> Self {
        Self {
            vm_fd,
            state: Mutex::new(State {
                msi_routes: BTreeMap::new(),
                free: Vec::new(),
                next: IOAPIC_PINS,
            }),
        }
    }

    /// GSIs currently allocated for MSI routes.
    pub fn allocated(&self) -> usize {
        let s = self.state.locked();
        (s.next - IOAPIC_PINS) as usize - s.free.len()
    }

    /// Number of MSI routes in the routing table.
    pub fn msi_routes(&self) -> usize {
        self.state.locked().msi_routes.len()
    }

    fn commit(&self, state: &State) -> io::Result<()> {
        let mut entries = legacy_routes();
        entries.extend(
            state
                .msi_routes
                .iter()
                .map(|(&gsi, msg)| msi_route(gsi, *msg)),
        );
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "GSI routing table too large")
        })?;
        self.vm_fd
            .set_gsi_routing(&table)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// The routes KVM sets up by default: every IOAPIC pin, and the ISA IRQs on the PICs.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
        e.u.irqchip.pin = gsi;
        v.push(e);
        if gsi < PIC_IRQS {
            let mut p = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            p.u.irqchip.irqchip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            p.u.irqchip.pin = gsi % 8;
            v.push(p);
        }
    }
    v
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

fn kvm_io(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl InterruptRouter for GsiRouter {
    fn allocate_gsi(&self) -> io::Result<u32> {
        let mut s = self.state.locked();
        if let Some(gsi) = s.free.pop() {
            return Ok(gsi);
        }
        if s.next > MAX_GSI {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("all {} MSI GSIs are in use", MAX_GSI + 1 - IOAPIC_PINS),
            ));
        }
        let gsi = s.next;
        s.next += 1;
        Ok(gsi)
    }

    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
        let mut s = self.state.locked();
        let old = s.msi_routes.insert(gsi, msg);
        if old == Some(msg) {
            return Ok(());
        }
        let r = self.commit(&s);
        if r.is_err() {
            match old {
                Some(m) => s.msi_routes.insert(gsi, m),
                None => s.msi_routes.remove(&gsi),
            };
        }
        r
    }

    fn free_gsi(&self, gsi: u32) {
        self.free_gsis(&[gsi]);
    }

    fn free_gsis(&self, gsis: &[u32]) {
        let mut s = self.state.locked();
        let mut routes_dropped = false;
        for &gsi in gsis {
            if gsi < IOAPIC_PINS || gsi >= s.next || s.free.contains(&gsi) {
                log::warn!("freeing GSI {gsi} that is not allocated");
                continue;
            }
            routes_dropped |= s.msi_routes.remove(&gsi).is_some();
            s.free.push(gsi);
        }
        // One commit for all of them: a device with 2048 vectors is one table change.
        if routes_dropped {
            if let Err(e) = self.commit(&s) {
                log::warn!("cannot drop the routes of {} GSIs: {e}", gsis.len());
            }
        }
    }

    fn add_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
        self.vm_fd.register_irqfd(fd, gsi).map_err(kvm_io)
    }

    fn add_resample_irqfd(&self, gsi: u32, fd: &EventFd, resample: &EventFd) -> io::Result<()> {
        self.vm_fd
            .register_irqfd_with_resample(fd, resample, gsi)
            .map_err(kvm_io)
    }

    fn remove_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
        self.vm_fd.unregister_irqfd(fd, gsi).map_err(kvm_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_cover_ioapic_and_pic() {
        let r = legacy_routes();
        assert_eq!(r.len(), (IOAPIC_PINS + PIC_IRQS) as usize);
        assert!(r.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
    }

    #[test]
    fn msi_route_splits_address() {
        let e = msi_route(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4021,
            },
        );
        // SAFETY: the entry was built as an MSI route, so `msi` is the active union member.
        let msi = unsafe { e.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_1000, 1, 0x4021)
        );
    }
}
