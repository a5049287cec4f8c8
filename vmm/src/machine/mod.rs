//! The machine built when a VM is created: the guest memory map ([`layout`]), the platform
//! devices and passthrough devices present at boot ([`device_manager`]), the PCIe segment with
//! its root ports ([`pci`]) and the ACPI tables that describe them ([`acpi`]).

pub mod acpi;
pub mod device_manager;
pub mod layout;
pub mod pci;
pub mod reset_vector;
