//! VFIO passthrough PCI devices of rvmm.
