//! The PCI segment: a host bridge at 00.0 of the root bus and N hot-plug root ports, with
//! configuration accesses routed by bus number.
//!
//! Root port `i` is device `1 + i / 8`, function `i % 8` of the root bus, owns physical slot
//! `i + 1` and starts with secondary = subordinate = root bus + `i + 1`. The guest may
//! renumber buses: accesses to other buses go to the port whose *current* secondary..=
//! subordinate range holds the bus.
//!
//! With several root buses ([`SegmentConfig::root_buses`] `k` > 1: one host bridge per guest
//! NUMA node, as ACPI describes them), the bus range is cut into `k` equal parts, root bus `g`
//! being the first bus of part `g`; port `i` is the `j = i / k`-th port of root bus `g = i % k`:
//! device `1 + j / 8`, function `j % 8` there, secondary bus root bus `g` + `j + 1`. Only root
//! bus 0 has the host bridge function at 00.0.

use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::allocator::{align_up, AddressAllocator, AddressRange};
use crate::bdf::Bdf;
use crate::device::{MsiSender, PciDevice};
use crate::header::{BusNumbers, IO_WINDOW_GRANULARITY, WINDOW_GRANULARITY};
use crate::host_bridge::HostBridge;
use crate::pcie_cap::{LinkSpeed, LinkWidth};
use crate::root_port::slot::SlotEvents;
use crate::root_port::{
    PortWindows, RootPort, RootPortConfig, RootPortError, SharedRootPort, ABSENT,
};
use rvmm_devices::sync::MutexExt;

/// Most root ports a segment supports.
pub const MAX_ROOT_PORTS: usize = 128;
/// Functions per device.
const FUNCTIONS_PER_DEVICE: usize = 8;
/// Bytes of ECAM space per bus.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Plain description of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentConfig {
    /// Guest-physical base of the ECAM window (recorded for ACPI's MCFG).
    pub ecam_base: u64,
    /// First bus number (the root bus).
    pub bus_start: u8,
    /// Last bus number.
    pub bus_end: u8,
    /// The 32-bit MMIO window shared out among the ports.
    pub mmio32: AddressRange,
    /// The 64-bit MMIO window shared out among the ports.
    pub mmio64: AddressRange,
    /// The 64-bit window each port gets (a power of two of at least 1 MiB, aligned to its size),
    /// or `None` to share `mmio64` out evenly (the largest power of two that fits each port).
    pub mmio64_per_port: Option<u64>,
    /// Without `mmio64_per_port`: the least 64-bit window port `i` must get (the 64-bit BARs of
    /// the device cold-plugged there); ports with a minimum above the even share get windows
    /// sized to it and the other ports share the rest. Missing entries and zero: no minimum.
    pub mmio64_minimums: Vec<u64>,
    /// The I/O port window shared out among the ports, 4 KiB each in port order while it lasts
    /// (size 0: no I/O windows).
    pub io: AddressRange,
    /// Number of root ports (1..=128).
    pub root_ports: usize,
    /// Link speed of every port.
    pub link_speed: LinkSpeed,
    /// Link width of every port.
    pub link_width: LinkWidth,
    /// Number of root buses (1, or one per guest NUMA node); port `i` is on root bus
    /// `i % root_buses`.
    pub root_buses: usize,
}

impl SegmentConfig {
    /// The number of root buses, at least 1.
    fn groups(&self) -> usize {
        self.root_buses.max(1)
    }

    /// The bus range (first = the root bus, last) of root bus `group`.
    pub fn root_bus_range(&self, group: usize) -> (u8, u8) {
        let k = self.groups();
        let buses = usize::from(self.bus_end) + 1 - usize::from(self.bus_start);
        let span = buses / k;
        // group < k and span * k <= buses: both fit the u8 bus range.
        let first = usize::from(self.bus_start) + group * span;
        let last = if group + 1 == k {
            usize::from(self.bus_end)
        } else {
            first + span - 1
        };
        (first as u8, last as u8)
    }
}

/// A root port as the hot-plug manager and ACPI see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// Index of the port in the segment.
    pub index: usize,
    /// Address of the port on the root bus.
    pub address: Bdf,
    /// Physical Slot Number.
    pub slot_number: u16,
    /// Secondary bus assigned at construction.
    pub secondary_bus: u8,
    /// Bridge windows assigned at construction.
    pub windows: PortWindows,
}

/// Errors of segment construction.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SegmentError {
    /// The number of root ports is out of range.
    #[error("{count} root ports requested, supported are 1 to {max}")]
    InvalidPortCount {
        /// Requested number.
        count: usize,
        /// Largest supported number.
        max: usize,
    },
    /// The bus range is empty or cannot give every port its own bus.
    #[error("bus range {start}..={end} cannot hold the root bus and {ports} port buses")]
    TooFewBuses {
        /// First bus.
        start: u8,
        /// Last bus.
        end: u8,
        /// Number of ports.
        ports: usize,
    },
    /// The 32-bit window cannot give every port 1 MiB below 4 GiB.
    #[error("32-bit window {base:#x}+{size:#x} cannot give {ports} ports a 1 MiB-aligned window each below 4 GiB")]
    Mmio32TooSmall {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
        /// Number of ports.
        ports: usize,
    },
    /// The 64-bit window cannot give every port a size-aligned window of at least 1 MiB.
    #[error("64-bit window {base:#x}+{size:#x} cannot give {ports} ports a size-aligned window of at least 1 MiB each")]
    Mmio64TooSmall {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
        /// Number of ports.
        ports: usize,
    },
    /// The 64-bit window per port asked for is not a power of two of at least 1 MiB.
    #[error("a 64-bit window of {per_port:#x} bytes per root port is not a power of two of at least 1 MiB")]
    Mmio64PerPortInvalid {
        /// The size asked for.
        per_port: u64,
    },
    /// The 64-bit window cannot hold the 64-bit window per port asked for.
    #[error("64-bit window {base:#x}+{size:#x} cannot give {ports} root ports {per_port:#x} bytes each (size-aligned); ask for less per port or fewer ports")]
    Mmio64PerPortTooLarge {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
        /// Number of ports.
        ports: usize,
        /// The size per port asked for.
        per_port: u64,
    },
    /// The 64-bit window cannot hold the minimum windows and a window for every other port.
    #[error("64-bit window {base:#x}+{size:#x} cannot give the cold-plugged devices' 64-bit BARs their windows (the largest {largest:#x} bytes) and each of the other of the {ports} root ports 1 MiB; use fewer --root-ports")]
    Mmio64MinimumsTooLarge {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
        /// Number of ports.
        ports: usize,
        /// The largest minimum window (a power of two).
        largest: u64,
    },
    /// A root port could not be created.
    #[error("failed to create root port {index}")]
    RootPort {
        /// Index of the port.
        index: usize,
        /// What went wrong.
        #[source]
        source: RootPortError,
    },
}

/// Result type of segment construction.
pub type Result<T> = std::result::Result<T, SegmentError>;

/// Splits the windows evenly among `ports` ports: 32-bit windows 1 MiB granular and aligned,
/// 64-bit windows of the largest power-of-two size that fits, aligned to that size.
pub fn split_windows(
    mmio32: AddressRange,
    mmio64: AddressRange,
    ports: usize,
) -> Result<Vec<PortWindows>> {
    let count =
        u64::try_from(ports)
            .ok()
            .filter(|&n| n > 0)
            .ok_or(SegmentError::InvalidPortCount {
                count: ports,
                max: MAX_ROOT_PORTS,
            })?;
    let low = split_mmio32(mmio32, count).ok_or(SegmentError::Mmio32TooSmall {
        base: mmio32.base,
        size: mmio32.size,
        ports,
    })?;
    let high = split_mmio64(mmio64, count).ok_or(SegmentError::Mmio64TooSmall {
        base: mmio64.base,
        size: mmio64.size,
        ports,
    })?;
    Ok((0..count)
        .map(|i| PortWindows {
            mmio32: AddressRange::new(low.0 + i * low.1, low.1),
            mmio64: AddressRange::new(high.0 + i * high.1, high.1),
            io: None,
        })
        .collect())
}

/// Gives the first ports a 4 KiB I/O window each from `io` (4 KiB aligned), in port order,
/// while it lasts; the other ports get `None`.
pub fn split_io(io: AddressRange, ports: usize) -> Vec<Option<AddressRange>> {
    let end = io.base.saturating_add(io.size).min(0x1_0000);
    let start = align_up(io.base, IO_WINDOW_GRANULARITY).unwrap_or(u64::MAX);
    (0..ports as u64)
        .map(|i| {
            let base = start.checked_add(i.checked_mul(IO_WINDOW_GRANULARITY)?)?;
            (base.checked_add(IO_WINDOW_GRANULARITY)? <= end)
                .then(|| AddressRange::new(base, IO_WINDOW_GRANULARITY))
        })
        .collect()
}

/// (first base, size per port) of the 32-bit split.
fn split_mmio32(window: AddressRange, count: u64) -> Option<(u64, u64)> {
    let end = window
        .base
        .checked_add(window.size)
        .filter(|&end| end <= 1 << 32)?;
    let start = align_up(window.base, WINDOW_GRANULARITY)?;
    let per = (end.checked_sub(start)? / count) & !(WINDOW_GRANULARITY - 1);
    (per != 0).then_some((start, per))
}

/// Gives each of `ports` ports a 64-bit window of `per_port` bytes (a power of two of at least
/// 1 MiB), aligned to its size, from `window`.
pub fn reserve_mmio64(
    window: AddressRange,
    ports: usize,
    per_port: u64,
) -> Result<Vec<AddressRange>> {
    if !per_port.is_power_of_two() || per_port < WINDOW_GRANULARITY {
        return Err(SegmentError::Mmio64PerPortInvalid { per_port });
    }
    let too_large = || SegmentError::Mmio64PerPortTooLarge {
        base: window.base,
        size: window.size,
        ports,
        per_port,
    };
    let start = align_up(window.base, per_port).ok_or_else(too_large)?;
    let fits = u64::try_from(ports)
        .ok()
        .and_then(|n| n.checked_mul(per_port))
        .and_then(|total| start.checked_add(total - 1))
        .zip(window.last())
        .is_some_and(|(end, last)| end <= last);
    if !fits {
        return Err(too_large());
    }
    Ok((0..ports as u64)
        .map(|i| AddressRange::new(start + i * per_port, per_port))
        .collect())
}

/// Splits the 64-bit window so that port `i` gets at least `minimums[i]` (rounded up to a power
/// of two of at least 1 MiB) and every port the largest common power-of-two share that still
/// lets all windows fit, each aligned to its size (not necessarily in port order).
pub fn split_mmio64_with_minimums(
    window: AddressRange,
    ports: usize,
    minimums: &[u64],
) -> Result<Vec<AddressRange>> {
    let count = u64::try_from(ports).unwrap_or(u64::MAX).max(1);
    let mut needs = Vec::with_capacity(ports);
    let mut largest = WINDOW_GRANULARITY;
    for i in 0..ports {
        let need = minimums
            .get(i)
            .copied()
            .unwrap_or(0)
            .max(WINDOW_GRANULARITY)
            .checked_next_power_of_two()
            .unwrap_or(u64::MAX);
        largest = largest.max(need);
        needs.push(need);
    }
    let too_large = SegmentError::Mmio64MinimumsTooLarge {
        base: window.base,
        size: window.size,
        ports,
        largest,
    };
    if !largest.is_power_of_two() {
        return Err(too_large);
    }
    let even = window.size / count;
    let mut share = if even >= WINDOW_GRANULARITY {
        1u64 << (63 - even.leading_zeros())
    } else {
        WINDOW_GRANULARITY
    };
    while share >= WINDOW_GRANULARITY {
        let sizes: Vec<u64> = needs.iter().map(|&n| n.max(share)).collect();
        if let Some(windows) = place_windows(window, &sizes) {
            return Ok(windows);
        }
        share /= 2;
    }
    Err(too_large)
}

/// Places windows of `sizes` (powers of two) in `window`, each aligned to its size, largest
/// first; `None` when they do not all fit.
fn place_windows(window: AddressRange, sizes: &[u64]) -> Option<Vec<AddressRange>> {
    let mut alloc = AddressAllocator::new(window).ok()?;
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes.get(i).copied().unwrap_or(0)));
    let mut out = vec![AddressRange::new(0, 0); sizes.len()];
    for i in order {
        let size = *sizes.get(i)?;
        let base = alloc.allocate(size, size).ok()?;
        *out.get_mut(i)? = AddressRange::new(base, size);
    }
    Some(out)
}

/// (first base, size per port) of the 64-bit split.
fn split_mmio64(window: AddressRange, count: u64) -> Option<(u64, u64)> {
    let last = window.last()?;
    let share = window.size / count;
    if share < WINDOW_GRANULARITY {
        return None;
    }
    // Largest power of two not above the even share.
    let mut per = 1u64 << (63 - share.leading_zeros());
    while per >= WINDOW_GRANULARITY {
        let fits = align_up(window.base, per)
            .and_then(|start| Some((start, start.checked_add(count * per - 1)?)))
            .filter(|&(_, end)| end <= last);
        if let Some((start, _)) = fits {
            return Some((start, per));
        }
        per /= 2;
    }
    None
}

/// Which function of the root bus an access reaches.
enum RootFunction {
    HostBridge,
    Port(usize),
}

/// The host bridge and root ports of segment 0.
pub struct PciSegment {
    config: SegmentConfig,
    host_bridge: Mutex<HostBridge>,
    ports: Vec<SharedRootPort>,
    infos: Vec<PortInfo>,
}

impl PciSegment {
    /// Builds the segment described by `config`. Every port sends its hot-plug MSIs through
    /// `msi` and reports guest slot changes to `events`.
    pub fn new(
        config: SegmentConfig,
        msi: Arc<dyn MsiSender>,
        events: Arc<dyn SlotEvents>,
    ) -> Result<Self> {
        let n = config.root_ports;
        if !(1..=MAX_ROOT_PORTS).contains(&n) {
            return Err(SegmentError::InvalidPortCount {
                count: n,
                max: MAX_ROOT_PORTS,
            });
        }
        let k = config.groups();
        let bus_count = usize::from(config.bus_end)
            .checked_sub(usize::from(config.bus_start))
            .map(|d| d + 1);
        // Each root bus needs itself and one bus per port of its own.
        let ports_per_group = n.div_ceil(k);
        if k > n || bus_count.is_none_or(|buses| buses / k <= ports_per_group) {
            return Err(SegmentError::TooFewBuses {
                start: config.bus_start,
                end: config.bus_end,
                ports: n,
            });
        }
        let mut windows = split_windows(config.mmio32, config.mmio64, n)?;
        if let Some(per_port) = config.mmio64_per_port {
            let reserved = reserve_mmio64(config.mmio64, n, per_port)?;
            for (w, mmio64) in windows.iter_mut().zip(reserved) {
                w.mmio64 = mmio64;
            }
        } else if windows
            .first()
            .is_some_and(|w| config.mmio64_minimums.iter().any(|&m| m > w.mmio64.size))
        {
            let sized = split_mmio64_with_minimums(config.mmio64, n, &config.mmio64_minimums)?;
            for (w, mmio64) in windows.iter_mut().zip(sized) {
                w.mmio64 = mmio64;
            }
        }
        for (w, io) in windows.iter_mut().zip(split_io(config.io, n)) {
            w.io = io;
        }
        let mut ports = Vec::with_capacity(n);
        let mut infos = Vec::with_capacity(n);
        for (index, windows) in windows.into_iter().enumerate() {
            // Bounded by the checks above: index < 128 and each root bus has a bus for each of
            // its ports after it.
            let (group, j) = (index % k, index / k);
            let (root_bus, _) = config.root_bus_range(group);
            let in_group = (n - group).div_ceil(k);
            let secondary = root_bus + j as u8 + 1;
            let device = 1 + j / FUNCTIONS_PER_DEVICE;
            let function = j % FUNCTIONS_PER_DEVICE;
            let functions_on_device = (in_group - (device - 1) * FUNCTIONS_PER_DEVICE).min(8);
            let port_config = RootPortConfig {
                index,
                buses: BusNumbers {
                    primary: root_bus,
                    secondary,
                    subordinate: secondary,
                },
                slot_number: index as u16 + 1,
                port_number: index as u8 + 1,
                windows,
                link_speed: config.link_speed,
                link_width: config.link_width,
                multi_function: function == 0 && functions_on_device > 1,
            };
            let port = RootPort::new(port_config, msi.clone(), events.clone())
                .map_err(|source| SegmentError::RootPort { index, source })?;
            ports.push(Arc::new(Mutex::new(port)));
            infos.push(PortInfo {
                index,
                address: Bdf {
                    domain: 0,
                    bus: root_bus,
                    device: device as u8,
                    function: function as u8,
                },
                slot_number: port_config.slot_number,
                secondary_bus: secondary,
                windows,
            });
        }
        Ok(Self {
            config,
            host_bridge: Mutex::new(HostBridge::new()),
            ports,
            infos,
        })
    }

    /// The configuration the segment was built from.
    pub fn config(&self) -> &SegmentConfig {
        &self.config
    }

    /// Size of the ECAM window: 1 MiB per bus of the bus range.
    pub fn ecam_size(&self) -> u64 {
        (u64::from(self.config.bus_end) - u64::from(self.config.bus_start) + 1) * ECAM_BUS_SIZE
    }

    /// Root port `index`.
    pub fn port(&self, index: usize) -> Option<&SharedRootPort> {
        self.ports.get(index)
    }

    /// Every root port with its address, slot, bus and windows, in index order.
    pub fn ports(&self) -> &[PortInfo] {
        &self.infos
    }

    /// The port owning physical slot `slot_number`.
    pub fn port_by_slot(&self, slot_number: u16) -> Option<(&PortInfo, &SharedRootPort)> {
        let index = self
            .infos
            .iter()
            .position(|info| info.slot_number == slot_number)?;
        Some((self.infos.get(index)?, self.ports.get(index)?))
    }

    /// The root bus group whose root bus is `bus`, if `bus` is a root bus.
    fn root_group(&self, bus: u8) -> Option<usize> {
        (0..self.config.groups()).find(|&g| self.config.root_bus_range(g).0 == bus)
    }

    fn root_function(&self, group: usize, device: u8, function: u8) -> Option<RootFunction> {
        match (device, function) {
            (0, 0) if group == 0 => Some(RootFunction::HostBridge),
            (0, _) => None,
            _ => {
                let j = (usize::from(device) - 1) * FUNCTIONS_PER_DEVICE + usize::from(function);
                let index = j * self.config.groups() + group;
                (index < self.ports.len()).then_some(RootFunction::Port(index))
            }
        }
    }

    /// Runs `f` on the port whose current bus range holds `bus` (a bus other than the root).
    fn with_port_for_bus<R>(&self, bus: u8, f: impl FnOnce(&RootPort) -> R) -> Option<R> {
        let n = self.ports.len();
        // Try the port that owns the bus by default first, then all others.
        let guess = usize::from(bus.wrapping_sub(self.config.bus_start)).saturating_sub(1) % n;
        (0..n)
            .filter_map(|k| self.ports.get((guess + k) % n))
            .map(|p| p.locked())
            .find(|port| port.bus_numbers().routes(bus))
            .map(|port| f(&port))
    }

    fn decodes(&self, bus: u8, device: u8, function: u8) -> bool {
        device < 32 && function < 8 && (self.config.bus_start..=self.config.bus_end).contains(&bus)
    }

    /// Reads register `reg` of function `bus:device.function`; absent functions read all ones.
    pub fn read_config(&self, bus: u8, device: u8, function: u8, reg: usize) -> u32 {
        if !self.decodes(bus, device, function) {
            return ABSENT;
        }
        let Some(group) = self.root_group(bus) else {
            // The port's lock is let go before the device is called (see downstream_device).
            return self
                .with_port_for_bus(bus, |port| port.downstream_device(bus, device, function))
                .flatten()
                .map_or(ABSENT, |dev| dev.locked().read_config_register(reg));
        };
        match self.root_function(group, device, function) {
            Some(RootFunction::HostBridge) => self.host_bridge.locked().read_config_register(reg),
            Some(RootFunction::Port(i)) => self
                .ports
                .get(i)
                .map_or(ABSENT, |p| p.locked().read_config_register(reg)),
            None => ABSENT,
        }
    }

    /// Writes `data` at byte `offset` of register `reg` of function `bus:device.function`;
    /// writes to absent functions are dropped.
    pub fn write_config(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        if !self.decodes(bus, device, function) {
            return;
        }
        let Some(group) = self.root_group(bus) else {
            let dev = self
                .with_port_for_bus(bus, |port| port.downstream_device(bus, device, function))
                .flatten();
            if let Some(dev) = dev {
                dev.locked().write_config_register(reg, offset, data);
            }
            return;
        };
        match self.root_function(group, device, function) {
            Some(RootFunction::HostBridge) => self
                .host_bridge
                .locked()
                .write_config_register(reg, offset, data),
            Some(RootFunction::Port(i)) => {
                if let Some(port) = self.ports.get(i) {
                    port.locked().write_config_register(reg, offset, data);
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
#[path = "segment_tests.rs"]
pub(crate) mod tests;
