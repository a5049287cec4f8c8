//! The ioctl request numbers the filters allow, computed the way the kernel headers define them
//! (`_IO`/`_IOW`/`_IOWR` over the argument struct's size) so that they cannot drift from the
//! bindings rvmm calls KVM and VFIO with.

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_create_device, kvm_device_attr, kvm_irq_routing, kvm_irqfd, kvm_msi,
    kvm_userspace_memory_region,
};

const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`; argument structs are far below the 14-bit size limit.
const fn ioc(dir: u32, kind: u32, nr: u32, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | (kind << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// KVM's ioctl type.
const KVMIO: u32 = 0xae;
/// VFIO's ioctl type (`';'`); VFIO ioctls are `_IO(VFIO_TYPE, VFIO_BASE + n)`.
const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

const fn vfio(n: u32) -> u32 {
    ioc(IOC_NONE, VFIO_TYPE, VFIO_BASE + n, 0)
}

/// Runs a vCPU.
pub const KVM_RUN: u32 = ioc(IOC_NONE, KVMIO, 0x80, 0);
/// Adds, moves or deletes a guest memory slot.
pub const KVM_SET_USER_MEMORY_REGION: u32 = ioc(
    IOC_WRITE,
    KVMIO,
    0x46,
    size_of::<kvm_userspace_memory_region>(),
);
/// Replaces the GSI routing table.
pub const KVM_SET_GSI_ROUTING: u32 = ioc(IOC_WRITE, KVMIO, 0x6a, size_of::<kvm_irq_routing>());
/// Binds or unbinds an eventfd to a GSI.
pub const KVM_IRQFD: u32 = ioc(IOC_WRITE, KVMIO, 0x76, size_of::<kvm_irqfd>());
/// Injects one MSI.
pub const KVM_SIGNAL_MSI: u32 = ioc(IOC_WRITE, KVMIO, 0xa5, size_of::<kvm_msi>());
/// Queries a KVM capability.
pub const KVM_CHECK_EXTENSION: u32 = ioc(IOC_NONE, KVMIO, 0x03, 0);
/// Creates an in-kernel device (the KVM-VFIO pseudo device).
pub const KVM_CREATE_DEVICE: u32 = ioc(
    IOC_READ | IOC_WRITE,
    KVMIO,
    0xe0,
    size_of::<kvm_create_device>(),
);
/// Sets a device attribute (adds or removes a VFIO group on the KVM-VFIO device).
pub const KVM_SET_DEVICE_ATTR: u32 = ioc(IOC_WRITE, KVMIO, 0xe1, size_of::<kvm_device_attr>());
/// Asks whether a device attribute exists.
pub const KVM_HAS_DEVICE_ATTR: u32 = ioc(IOC_WRITE, KVMIO, 0xe3, size_of::<kvm_device_attr>());

/// Reads the VM's kvmclock (a pause holds it still).
pub const KVM_GET_CLOCK: u32 = ioc(IOC_READ, KVMIO, 0x7c, size_of::<kvm_clock_data>());
/// Sets the VM's kvmclock (a resume writes back what the pause read).
pub const KVM_SET_CLOCK: u32 = ioc(IOC_WRITE, KVMIO, 0x7b, size_of::<kvm_clock_data>());

/// `VFIO_GET_API_VERSION`.
pub const VFIO_GET_API_VERSION: u32 = vfio(0);
/// `VFIO_CHECK_EXTENSION`.
pub const VFIO_CHECK_EXTENSION: u32 = vfio(1);
/// `VFIO_SET_IOMMU`.
pub const VFIO_SET_IOMMU: u32 = vfio(2);
/// `VFIO_GROUP_GET_STATUS`.
pub const VFIO_GROUP_GET_STATUS: u32 = vfio(3);
/// `VFIO_GROUP_SET_CONTAINER`.
pub const VFIO_GROUP_SET_CONTAINER: u32 = vfio(4);
/// `VFIO_GROUP_UNSET_CONTAINER`.
pub const VFIO_GROUP_UNSET_CONTAINER: u32 = vfio(5);
/// `VFIO_GROUP_GET_DEVICE_FD`.
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = vfio(6);
/// `VFIO_DEVICE_GET_INFO`.
pub const VFIO_DEVICE_GET_INFO: u32 = vfio(7);
/// `VFIO_DEVICE_GET_REGION_INFO`.
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = vfio(8);
/// `VFIO_DEVICE_GET_IRQ_INFO`.
pub const VFIO_DEVICE_GET_IRQ_INFO: u32 = vfio(9);
/// `VFIO_DEVICE_SET_IRQS`: enables, disables and triggers a device's interrupts.
pub const VFIO_DEVICE_SET_IRQS: u32 = vfio(10);
/// `VFIO_DEVICE_RESET`.
pub const VFIO_DEVICE_RESET: u32 = vfio(11);
/// `VFIO_IOMMU_GET_INFO` on a container (the same number as
/// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` on a device).
pub const VFIO_IOMMU_GET_INFO: u32 = vfio(12);
/// `VFIO_IOMMU_MAP_DMA` on a container.
pub const VFIO_IOMMU_MAP_DMA: u32 = vfio(13);
/// `VFIO_IOMMU_UNMAP_DMA` on a container.
pub const VFIO_IOMMU_UNMAP_DMA: u32 = vfio(14);

/// `TCGETS`: whether an fd is a terminal (`isatty`), and its settings.
pub const TCGETS: u32 = 0x5401;
/// `FIONBIO`: sets or clears non-blocking mode.
pub const FIONBIO: u32 = 0x5421;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_SIGNAL_MSI, 0x4020_aea5);
        assert_eq!(KVM_CREATE_DEVICE, 0xc00c_aee0);
        assert_eq!(KVM_SET_DEVICE_ATTR, 0x4018_aee1);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
        assert_eq!(KVM_SET_CLOCK, 0x4030_ae7b);
    }

    #[test]
    fn vfio_numbers_match_the_kernel_headers() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
    }

    #[test]
    fn tty_numbers_match_libc() {
        assert_eq!(u64::from(TCGETS), libc::TCGETS);
        assert_eq!(u64::from(FIONBIO), libc::FIONBIO);
    }
}
