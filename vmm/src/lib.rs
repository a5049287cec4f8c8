//! rvmm: a minimal KVM virtual machine monitor for PCI passthrough with native PCIe hotplug.
//!
//! Build a [`VmConfig`] (or read one from JSON), create a [`Vm`] with [`Vm::new`] (memory
//! reserved, machine built, cold-plugged devices attached) and boot it with [`Vm::run`] (vCPUs
//! started). The `rvmm` binary is
//! a thin command-line layer over this library.
//!
//! The modules follow the jobs of the VMM:
//!
//! | module | job |
//! |---|---|
//! | [`vm`] | the VM's life: configuration, creation, the event loop, the console, how it ends |
//! | [`manager`] | rvmm without a VM: the VMM that creates, boots and deletes VMs through the API |
//! | [`machine`] | the machine built at start: guest memory map, platform devices, PCIe segment, ACPI tables |
//! | [`device`] | passthrough devices: their nouns (id, spec, state), group descriptors, attach and release |
//! | [`hotplug`] | the controller that adds and removes devices at run time through the root-port slots |
//! | [`kvm`] | adapters that give device models KVM: guest MMIO slots, GSI/MSI routing, MSI signalling |
//! | [`cpu`] | vCPU setup and the vCPU threads |
//! | [`boot`] | loading the kernel (bzImage or PVH ELF), initramfs and boot parameters |
//! | [`memory`] | reserving, prefaulting and locking guest RAM |
//! | [`placement`] | host locality: guest RAM and vCPU threads on the devices' NUMA node |
//! | [`api`] | the control API (HTTP/JSON server, client, `rvmm ctl`) |
//! | [`observe`] | the event log, the counters, rvmm's own log |
//! | [`seccomp`] | per-thread syscall filters |

pub mod api;
pub mod boot;
pub mod cpu;
pub mod device;
pub mod hotplug;
pub mod kvm;
pub mod machine;
pub mod manager;
pub mod memory;
pub mod observe;
pub mod placement;
pub mod seccomp;
pub mod vm;

pub use memory::MemoryConfig;
pub use seccomp::SeccompMode;
pub use vm::config::{SerialConfig, VmConfig};
pub use vm::exit::VmExit;
pub use vm::{Vm, VmError};
