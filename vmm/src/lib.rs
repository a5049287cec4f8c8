//! rvmm: a minimal KVM virtual machine monitor for PCI passthrough with native PCIe hotplug.
//!
//! Build a [`VmConfig`], create a [`Vm`] with [`Vm::new`] and [`Vm::run`] it. The `rvmm` binary is
//! a thin command-line layer over this library.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod controller;
pub mod cpu;
pub mod device;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod guest_mmio;
pub mod interrupts;
pub mod irq_routing;
pub mod layout;
pub mod memory;
pub mod passthrough;
pub mod pci;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

pub use config::{SerialConfig, VmConfig};
pub use exit::VmExit;
pub use memory::MemoryConfig;
pub use seccomp::SeccompMode;
pub use vm::{Vm, VmError};
