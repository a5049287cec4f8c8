//! Interrupt delivery the VMM provides to device models.

use std::sync::Arc;

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use rvmm_pci::{MsiMessage, MsiSender};

/// Sends MSIs with `KVM_SIGNAL_MSI` (root-port hotplug interrupts: rare, so no GSI route needed).
pub struct KvmMsiSender {
    vm_fd: Arc<VmFd>,
}

impl KvmMsiSender {
    /// Creates a sender for the VM.
    pub fn new(vm_fd: Arc<VmFd>) -> Self {
        Self { vm_fd }
    }
}

impl MsiSender for KvmMsiSender {
    fn send(&self, msg: MsiMessage) -> std::io::Result<()> {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        match self.vm_fd.signal_msi(msi) {
            // 0: the interrupt was blocked by the guest (e.g. masked in the LAPIC); not an error.
            Ok(_) => Ok(()),
            Err(e) => Err(std::io::Error::from_raw_os_error(e.errno())),
        }
    }
}
