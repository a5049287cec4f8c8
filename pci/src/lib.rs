//! PCI Express model of rvmm: config space, the host bridge (ECAM and 0xCF8/0xCFC), hotplug-capable
//! root ports and the allocators for bus numbers and address windows.
//!
//! - [`config`]: the 4 KiB configuration space with write masks and the capability builder;
//!   [`header`]: type 0 / type 1 headers.
//! - [`root_port`], [`pcie_cap`], [`msi`], [`root_port::slot`]: a hot-plug capable PCIe root port, its
//!   PCI Express and MSI capabilities, and the slot state machine driven by the hot-plug manager
//!   and the guest's pciehp.
//! - [`segment`], [`host_bridge`], [`config_access`]: the host bridge and N root ports of
//!   segment 0, routed by bus number, behind 0xCF8/0xCFC and ECAM front-ends.
//! - [`aer`]: Advanced Error Reporting registers (root ports, and an endpoint model for
//!   passthrough devices).
//! - [`pending`]: a hot-added device announced in its slot while the VMM still opens it.
//! - [`allocator`]: address ranges and an aligned allocator for BARs inside a port window.

pub mod aer;
pub mod allocator;
pub mod bdf;
pub mod config;
pub mod config_access;
pub mod device;
pub mod header;
pub mod host_bridge;
pub mod msi;
pub mod pcie_cap;
pub mod pending;
pub mod root_port;
pub mod segment;

pub use allocator::{AddressAllocator, AddressRange};
pub use bdf::{Bdf, BdfError, SYSFS_PCI_DEVICES};
pub use config_access::{EcamAccess, PioConfigAccess, PIO_CONFIG_BASE, PIO_CONFIG_LEN};
pub use device::{MsiMessage, MsiSender, PciDevice};
pub use pcie_cap::{LinkSpeed, LinkWidth};
pub use pending::{pending_device, PendingDevice, PendingHandle};
pub use root_port::slot::{SlotDevice, SlotError, SlotEvents, SlotState};
pub use root_port::{AerSignal, PortWindows, RootPort, SharedRootPort};
pub use segment::{PciSegment, PortInfo, SegmentConfig};
