//! What rvmm tells about a running VM besides its events stream: the event log
//! (`--event-log`), the counters of `GET /v1/vm/counters` (`rvmm ctl counters`) and rvmm's own
//! log (`--log-level`, `--log-file`).
//!
//! | module | job |
//! |---|---|
//! | [`event_log`] | every event, as JSON lines, from the start of the VM, written by a thread of its own |
//! | [`counters`] | KVM exits per vCPU by reason, uptime, reboots |
//! | [`interrupts`] | passthrough devices' host interrupt counts from `/proc/interrupts` |
//! | [`hotplug_stats`] | hotplug operations by kind with their last and median duration |
//! | [`logging`] | the `rvmm` binary's logger |

pub mod counters;
pub mod event_log;
pub mod hotplug_stats;
pub mod interrupts;
pub mod logging;

use rvmm_pci::Bdf;
use serde::{Deserialize, Serialize};

use crate::device::DeviceId;
pub use counters::{ExitReason, VcpuExits, VmCounters};
pub use event_log::{EventLog, EventLogCounts, EventLogTarget};
pub use hotplug_stats::{HotplugOpCounts, HotplugOpKind, HotplugStats};
pub use interrupts::{VectorCount, VectorKind};

/// `GET /v1/vm/counters` answer: what the VM has done since it started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Milliseconds since the vCPUs first started.
    pub uptime_ms: u64,
    /// Reboots in place (the VM kept running with a fresh guest).
    pub reboots: u64,
    /// Every vCPU's KVM exits by reason.
    pub vcpus: Vec<VcpuCounters>,
    /// Every passthrough device, in slot order.
    pub devices: Vec<DeviceCounters>,
    /// Finished hotplug operations by kind (kinds that never happened are left out).
    pub hotplug: Vec<HotplugOpCounts>,
    /// Guest RAM.
    pub memory: MemoryCounters,
    /// The event log's writes and drops, with `--event-log` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_log: Option<EventLogCounts>,
}

/// One vCPU's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCounters {
    /// The vCPU (its APIC id).
    pub index: u8,
    /// KVM exits that reached rvmm, by reason.
    pub exits: VcpuExits,
}

/// One passthrough device's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCounters {
    /// Its name.
    pub id: DeviceId,
    /// Its address on the host.
    pub host_bdf: Bdf,
    /// The host's count of every interrupt vector the device has live (from
    /// `/proc/interrupts`, summed over host CPUs): each is delivered to the guest through an
    /// irqfd. A vector the guest has not unmasked yet has no host interrupt and is not listed.
    pub interrupts: Vec<VectorCount>,
    /// Guest RAM mapped for the device's DMA in the VM's VFIO container (the devices of a VM
    /// share it: each can reach all of guest RAM).
    pub dma_mapped_bytes: u64,
}

/// Guest RAM as reserved at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryCounters {
    /// Guest RAM mapped and prefaulted.
    pub reserved_bytes: u64,
    /// Memory the kernel counts as locked in rvmm (`VmLck`: all of 4 KiB-backed guest RAM, and
    /// again while a passthrough device has it pinned for DMA; hugetlb pages, never swapped,
    /// are not counted there by Linux).
    pub locked_bytes: u64,
    /// The page size backing guest RAM.
    pub page_size: u64,
}
