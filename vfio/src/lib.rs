//! VFIO passthrough PCI devices of rvmm.
//!
//! - [`container`]: one VFIO container per VM, DMA-mapping guest RAM.
//! - [`legacy`]: our own layer over the legacy VFIO container/group interface (pre-opened fds,
//!   groups released with their last device).
//! - [`host`]: host-side checks (device, driver, IOMMU group, ownership, memlock) with errors
//!   that name the device and the fix.
//! - [`VfioPciDevice`]: the passthrough device model: virtual config space (BARs, MSI, MSI-X,
//!   hidden capabilities, filtered writes), BAR placement in the guest, interrupt wiring, release;
//!   [`aer`]: the guest's AER capability of the device, where host errors are reported.
//! - [`limit`]: the passthrough device limit.
//! - [`sriov`]: SR-IOV VF pools: taking a free VF of a PF, its port policy (MAC address, VLAN,
//!   spoof checking, trust) through rtnetlink, vfio-pci binding, and giving it back.
//!
//! The VMM plugs in through two small traits: [`InterruptRouter`] (GSIs, MSI routes, irqfds) and
//! [`GuestMmio`] (memory slots and trapped ranges).

mod access;
pub mod aer;
pub mod backend;
pub mod bars;
pub mod caps;
pub mod config;
pub mod container;
pub mod device;
pub mod host;
pub mod interrupts;
pub mod layout;
pub mod legacy;
pub mod limit;
pub mod mmio;
pub mod msi;
pub mod msix;
mod reboot;
pub mod sriov;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use backend::{DeviceBackend, MmapArea, RegionInfo, VfioBackend};
pub use bars::{BarInfo, BarKind};
pub use container::{
    create_kvm_vfio_device, Container, ContainerError, DeviceAttachment, IommuBackend, IommuInfo,
    IovaRange, Type1Iommu,
};
pub use device::{DeviceConfig, DeviceError, VfioPciDevice};
pub use host::{GroupHolder, GroupMember, HostDevice, HostError, Sysfs};
pub use interrupts::{InterruptError, InterruptRouter, IrqMode};
pub use legacy::{GroupFdMismatch, LegacyContainer, VfioDevice, VfioError};
pub use limit::{check_passthrough_limit, LimitError, MAX_PASSTHROUGH_DEVICES};
pub use mmio::{AddressSpace, GuestMmio, SlotId};
