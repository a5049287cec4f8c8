//! Adapters that give device models what they need of KVM without seeing KVM: guest MMIO slots
//! and trapped ranges ([`guest_mmio`]), GSI and MSI routing with irqfds ([`irq_routing`]), and
//! MSIs signalled directly ([`msi`], for the root ports' hotplug interrupts).

pub mod guest_mmio;
pub mod irq_routing;
pub mod msi;
