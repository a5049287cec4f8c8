//! PCI Express model of rvmm: config space, the host bridge (ECAM and 0xCF8/0xCFC), hotplug-capable
//! root ports and the allocators for bus numbers and address windows.

pub mod device;

pub use device::{MsiMessage, MsiSender, PciDevice};
