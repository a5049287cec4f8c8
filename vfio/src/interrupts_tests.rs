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
    irqs.update_vector(1, unmasked(0x21), &dev, &r).unwrap();
    assert_eq!(
        r.ops(),
        [
            RouterOp::Allocate(0),
            RouterOp::Route(0, msg(0x21)),
            RouterOp::AddIrqfd(0)
        ]
    );
    // Vectors 0 and 1 live; 2 and 3 are not until the guest unmasks them.
    assert_eq!(dev.enabled_irq(VFIO_PCI_MSIX_IRQ_INDEX), Some(2));
}

#[test]
fn masking_removes_the_irqfd_and_keeps_the_gsi() {
    let dev = FakeDevice::new();
    let r = FakeRouter::default();
    let mut irqs = Interrupts::new(None, &dev).unwrap();
    irqs.switch(IrqMode::Msix(4), &dev, &r).unwrap();
    irqs.update_vector(0, unmasked(0x21), &dev, &r).unwrap();
    irqs.update_vector(
        0,
        VectorWant {
            masked: true,
            msg: msg(0x21),
        },
        &dev,
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
    assert!(!irqs.pending(0));
    irqs.signal_vector(0);
    assert!(irqs.pending(0));
    assert!(
        !irqs.pending(1),
        "vector 1 is not live: nothing can be pending"
    );
    assert!(!irqs.pending(7));
}

fn masked(data: u32) -> VectorWant {
    VectorWant {
        masked: true,
        msg: msg(data),
    }
}

/// Whether vector `v`'s eventfd has a count (without consuming it).
fn signalled(irqs: &Interrupts, v: usize) -> bool {
    irqs.vectors[v].event.as_ref().is_some_and(is_signalled)
}

#[test]
fn msix_enable_makes_only_vector_0_live() {
    let dev = FakeDevice::new();
    let r = FakeRouter::default();
    let mut irqs = Interrupts::new(None, &dev).unwrap();
    irqs.switch(IrqMode::Msix(16), &dev, &r).unwrap();
    assert_eq!(irqs.mode(), IrqMode::Msix(16));
    assert_eq!(irqs.live_vectors(), 1);
    assert_eq!(dev.enabled_irq(VFIO_PCI_MSIX_IRQ_INDEX), Some(1));
    assert!(r.ops().is_empty(), "no GSI before a vector is unmasked");
}

#[test]
fn masked_table_entries_never_become_live() {
    let dev = FakeDevice::new();
    let r = FakeRouter::default();
    let mut irqs = Interrupts::new(None, &dev).unwrap();
    irqs.switch(IrqMode::Msix(16), &dev, &r).unwrap();
    for v in 0..16 {
        irqs.update_vector(v, masked(0x30), &dev, &r).unwrap();
    }
    assert_eq!(irqs.live_vectors(), 1);
    assert_eq!(dev.irq_enables(VFIO_PCI_MSIX_IRQ_INDEX), 1);
}

#[test]
fn unmasked_vector_of_a_resizable_index_is_added_alone() {
    let dev = FakeDevice::new();
    dev.set_irq_resizable(VFIO_PCI_MSIX_IRQ_INDEX);
    let r = FakeRouter::default();
    let mut irqs = Interrupts::new(None, &dev).unwrap();
    irqs.switch(IrqMode::Msix(16), &dev, &r).unwrap();
    irqs.update_vector(0, unmasked(0x30), &dev, &r).unwrap();
    irqs.update_vector(9, unmasked(0x31), &dev, &r).unwrap();
    assert_eq!(irqs.live_vectors(), 2);
    assert_eq!(dev.triggered_vectors(VFIO_PCI_MSIX_IRQ_INDEX), [0, 9]);
    assert_eq!(
        dev.irq_enables(VFIO_PCI_MSIX_IRQ_INDEX),
        1,
        "a resizable index is never enabled again"
    );
    assert!(
        !signalled(&irqs, 0),
        "nothing to replay when nothing was disabled"
    );
}

#[test]
fn unmasked_vector_past_a_noresize_index_enables_it_again_and_replays_vectors_in_use() {
    let dev = FakeDevice::new();
    let r = FakeRouter::default();
    let mut irqs = Interrupts::new(None, &dev).unwrap();
    irqs.switch(IrqMode::Msix(16), &dev, &r).unwrap();
    irqs.update_vector(0, unmasked(0x30), &dev, &r).unwrap();
    assert_eq!(dev.irq_enables(VFIO_PCI_MSIX_IRQ_INDEX), 1);

    irqs.update_vector(3, unmasked(0x31), &dev, &r).unwrap();

    assert_eq!(dev.irq_enables(VFIO_PCI_MSIX_IRQ_INDEX), 2);
    assert_eq!(dev.enabled_irq(VFIO_PCI_MSIX_IRQ_INDEX), Some(4));
    assert_eq!(irqs.live_vectors(), 4);
    assert!(
        signalled(&irqs, 0),
        "vector 0 was in use while the index was off: it must be signalled once"
    );
    assert!(!signalled(&irqs, 3), "vector 3 was not in use before");
    // Vectors below the highest one that were live already are not enabled again.
    irqs.update_vector(2, unmasked(0x32), &dev, &r).unwrap();
    assert_eq!(dev.irq_enables(VFIO_PCI_MSIX_IRQ_INDEX), 2);
}

#[test]
fn msi_vectors_are_all_live_at_enable() {
    let dev = FakeDevice::new();
    let r = FakeRouter::default();
    let mut irqs = Interrupts::new(None, &dev).unwrap();
    irqs.switch(IrqMode::Msi(8), &dev, &r).unwrap();
    assert_eq!(irqs.live_vectors(), 8);
    assert_eq!(dev.enabled_irq(VFIO_PCI_MSI_IRQ_INDEX), Some(8));
}

#[test]
fn teardown_after_lazy_vectors_frees_every_gsi() {
    let dev = FakeDevice::new();
    dev.set_irq_resizable(VFIO_PCI_MSIX_IRQ_INDEX);
    let r = FakeRouter::default();
    let mut irqs = Interrupts::new(None, &dev).unwrap();
    irqs.switch(IrqMode::Msix(16), &dev, &r).unwrap();
    for v in [0, 5, 15] {
        irqs.update_vector(v, unmasked(0x40 + v as u32), &dev, &r)
            .unwrap();
    }
    irqs.update_vector(5, masked(0x45), &dev, &r).unwrap();
    irqs.teardown(&dev, &r);
    assert!(r.live_gsis().is_empty());
    assert_eq!(irqs.live_vectors(), 0);
    assert_eq!(dev.enabled_irq(VFIO_PCI_MSIX_IRQ_INDEX), None);
}

#[test]
fn unchanged_message_is_not_rerouted_on_unmask() {
    let dev = FakeDevice::new();
    let r = FakeRouter::default();
    let mut irqs = Interrupts::new(None, &dev).unwrap();
    irqs.switch(IrqMode::Msi(1), &dev, &r).unwrap();
    irqs.update_vector(0, unmasked(1), &dev, &r).unwrap();
    irqs.update_vector(
        0,
        VectorWant {
            masked: true,
            msg: msg(1),
        },
        &dev,
        &r,
    )
    .unwrap();
    irqs.update_vector(0, unmasked(1), &dev, &r).unwrap();
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
    irqs.update_vector(0, unmasked(1), &dev, &r).unwrap();
    irqs.update_vector(3, unmasked(2), &dev, &r).unwrap();
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
    irqs.update_vector(0, unmasked(1), &dev, &r).unwrap();
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
    let err = irqs.update_vector(0, unmasked(1), &dev, &r).unwrap_err();
    assert!(matches!(err, InterruptError::Router { gsi: 0, .. }));
}
