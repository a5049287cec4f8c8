//! Fakes of the device, the interrupt router and the guest address space for unit tests, and
//! (with the `testing` feature) for the fuzz targets in tests/fuzz.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex};

use rvmm_devices::{Bus, SharedBusDevice};
use rvmm_pci::MsiMessage;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{DeviceBackend, MmapArea, RegionInfo};
use crate::interrupts::InterruptRouter;
use crate::layout::Mmappable;
use crate::mmio::{AddressSpace, GuestMmio, SlotId};

#[derive(Default)]
struct DeviceState {
    config: Vec<u8>,
    config_writes: Vec<(u64, Vec<u8>)>,
    regions: HashMap<u32, RegionInfo>,
    memory: HashMap<u32, Vec<u8>>,
    irq_counts: HashMap<u32, u32>,
    enabled: HashMap<u32, usize>,
    /// Per index: the vectors with a trigger eventfd, and how often it was enabled.
    triggers: HashMap<u32, std::collections::BTreeSet<u32>>,
    enables: HashMap<u32, u32>,
    resizable: std::collections::HashSet<u32>,
    resets: u32,
    /// When set, closing a handle waits until the gate opens (a host close that takes time).
    close_gate: Option<Arc<CloseGate>>,
}

/// Holds back the close of a [`FakeDevice`] handle until opened ([`FakeDevice::hold_close`]).
#[derive(Default)]
pub struct CloseGate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl CloseGate {
    /// Lets every held close (and every later one) go on.
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }
}

/// A fake VFIO PCI device: config space and BARs are plain memory.
#[derive(Clone)]
pub struct FakeDevice(Arc<Mutex<DeviceState>>);

/// Stores `value` little-endian at `offset` of `cfg` (test helper: panics out of bounds).
pub fn put32(cfg: &mut [u8], offset: usize, value: u32) {
    cfg[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// Loads the little-endian dword at `offset` of `cfg` (test helper: panics out of bounds).
pub fn get32(cfg: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(cfg[offset..offset + 4].try_into().unwrap())
}

impl Default for FakeDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeDevice {
    /// An endpoint with no BARs and no capabilities, 4 KiB config space, INTA.
    pub fn new() -> Self {
        let mut config = vec![0u8; 0x1000];
        put32(&mut config, 0, 0x10ca_8086);
        put32(&mut config, 8, 0x0200_0001);
        config[0x0e] = 0x80;
        config[0x3d] = 1;
        let mut state = DeviceState {
            config,
            ..Default::default()
        };
        state.regions.insert(
            VFIO_PCI_CONFIG_REGION_INDEX,
            RegionInfo {
                size: 0x1000,
                readable: true,
                writable: true,
                mmappable: Mmappable::None,
            },
        );
        for (index, count) in [
            (VFIO_PCI_INTX_IRQ_INDEX, 1),
            (VFIO_PCI_MSI_IRQ_INDEX, 8),
            (VFIO_PCI_MSIX_IRQ_INDEX, 16),
            (VFIO_PCI_ERR_IRQ_INDEX, 1),
            (VFIO_PCI_REQ_IRQ_INDEX, 1),
        ] {
            state.irq_counts.insert(index, count);
        }
        Self(Arc::new(Mutex::new(state)))
    }

    /// The device NVMe-like tests use: BAR0 64-bit 16 KiB memory with the MSI-X table (16
    /// vectors) at 0x2000 and the PBA at 0x3000, BAR2 32-bit prefetchable 4 KiB memory, BAR4 I/O
    /// 32 bytes, a 64 KiB ROM; capabilities PM 0x40, MSI 0x50 (64-bit, per-vector mask, 8
    /// vectors), PCIe 0x70, MSI-X 0xb0, AF 0xc0; extended AER 0x100, SR-IOV 0x140, ARI 0x180,
    /// ReBAR 0x1c0, DSN 0x200.
    pub fn nvme_like() -> Self {
        let dev = Self::new();
        {
            let mut s = dev.0.lock().unwrap();
            let cfg = &mut s.config;
            put32(cfg, 0x10, 0xfebf_0004);
            put32(cfg, 0x14, 0);
            put32(cfg, 0x18, 0xfea0_0008);
            put32(cfg, 0x20, 0xc001);
            cfg[0x06] = 0x10;
            cfg[0x34] = 0x40;
            // PM
            put32(cfg, 0x40, 0x0003_5001);
            // MSI: 64-bit, PVM, MMC = 3 (8 vectors)
            put32(cfg, 0x50, 0x0186_7005);
            // PCIe v2 endpoint; DevCap with FLR; DevCtl MPS 256
            put32(cfg, 0x70, 0x0002_b010);
            put32(cfg, 0x74, 0x1000_8fc1);
            put32(cfg, 0x78, 0x0000_2830);
            put32(cfg, 0x80, 0x0000_0040);
            // MSI-X: 16 vectors, table BAR0+0x2000, PBA BAR0+0x3000
            put32(cfg, 0xb0, 0x000f_c011);
            put32(cfg, 0xb4, 0x2000);
            put32(cfg, 0xb8, 0x3000);
            // AF
            put32(cfg, 0xc0, 0x0306_0013);
            // Extended: AER, SR-IOV, ARI, ReBAR, DSN
            put32(cfg, 0x100, 0x0001 | (1 << 16) | (0x140 << 20));
            put32(cfg, 0x140, 0x0010 | (1 << 16) | (0x180 << 20));
            put32(cfg, 0x150, 0xdead_beef);
            put32(cfg, 0x180, 0x000e | (1 << 16) | (0x1c0 << 20));
            put32(cfg, 0x1c0, 0x0015 | (1 << 16) | (0x200 << 20));
            put32(cfg, 0x200, 0x0003 | (1 << 16));
            for (index, size, mmappable) in [
                (0, 0x4000, Mmappable::Whole),
                (2, 0x1000, Mmappable::Whole),
                (4, 0x20, Mmappable::None),
                (6, 0x10000, Mmappable::None),
            ] {
                s.regions.insert(
                    index,
                    RegionInfo {
                        size,
                        readable: true,
                        writable: index != 6,
                        mmappable,
                    },
                );
                s.memory.insert(index, vec![0u8; size as usize]);
            }
        }
        dev
    }

    /// Runs `f` on the device's config space bytes.
    pub fn with_config(&self, f: impl FnOnce(&mut Vec<u8>)) {
        f(&mut self.0.lock().unwrap().config);
    }

    /// A copy of the device's config space bytes.
    pub fn config(&self) -> Vec<u8> {
        self.0.lock().unwrap().config.clone()
    }

    /// Every config region write that reached the device: (offset, bytes).
    pub fn config_writes(&self) -> Vec<(u64, Vec<u8>)> {
        self.0.lock().unwrap().config_writes.clone()
    }

    /// A copy of region `index`'s bytes (empty for a region without memory).
    pub fn memory(&self, index: u32) -> Vec<u8> {
        self.0
            .lock()
            .unwrap()
            .memory
            .get(&index)
            .cloned()
            .unwrap_or_default()
    }

    /// The number of eventfds enabled on VFIO IRQ index `index`, if enabled.
    pub fn enabled_irq(&self, index: u32) -> Option<usize> {
        self.0.lock().unwrap().enabled.get(&index).copied()
    }

    /// How many times the device was reset.
    pub fn resets(&self) -> u32 {
        self.0.lock().unwrap().resets
    }

    /// Makes every close of a handle of this device wait until the returned gate opens.
    pub fn hold_close(&self) -> Arc<CloseGate> {
        let gate = Arc::new(CloseGate::default());
        self.0.lock().unwrap().close_gate = Some(gate.clone());
        gate
    }

    /// How many handles to the device are open, this one included: a device model that closed
    /// its backend (released the device) holds none.
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.0)
    }

    /// Lets vectors be added to index `index` while it is enabled (VFIO without
    /// `VFIO_IRQ_INFO_NORESIZE`).
    pub fn set_irq_resizable(&self, index: u32) {
        self.0.lock().unwrap().resizable.insert(index);
    }

    /// The vectors of index `index` that have a trigger eventfd, in order.
    pub fn triggered_vectors(&self, index: u32) -> Vec<u32> {
        let s = self.0.lock().unwrap();
        s.triggers
            .get(&index)
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default()
    }

    /// How many times index `index` was enabled.
    pub fn irq_enables(&self, index: u32) -> u32 {
        self.0
            .lock()
            .unwrap()
            .enables
            .get(&index)
            .copied()
            .unwrap_or(0)
    }

    /// Sets the number of interrupts VFIO IRQ index `index` reports.
    pub fn set_irq_count(&self, index: u32, count: u32) {
        self.0.lock().unwrap().irq_counts.insert(index, count);
    }
}

fn range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    let start =
        usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let end = start.checked_add(n).filter(|&e| e <= len);
    end.map(|end| start..end)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

impl Drop for FakeDevice {
    fn drop(&mut self) {
        let gate = self.0.lock().map(|s| s.close_gate.clone()).ok().flatten();
        if let Some(gate) = gate {
            gate.wait();
        }
    }
}

impl DeviceBackend for FakeDevice {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        self.0.lock().unwrap().regions.get(&index).cloned()
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let s = self.0.lock().unwrap();
        let mem = if index == VFIO_PCI_CONFIG_REGION_INDEX {
            &s.config
        } else {
            s.memory.get(&index).ok_or(io::ErrorKind::NotFound)?
        };
        let r = range(mem.len(), offset, data.len())?;
        data.copy_from_slice(&mem[r]);
        Ok(())
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        if index == VFIO_PCI_CONFIG_REGION_INDEX {
            s.config_writes.push((offset, data.to_vec()));
        }
        let mem = if index == VFIO_PCI_CONFIG_REGION_INDEX {
            &mut s.config
        } else {
            s.memory.get_mut(&index).ok_or(io::ErrorKind::NotFound)?
        };
        let r = range(mem.len(), offset, data.len())?;
        mem[r].copy_from_slice(data);
        Ok(())
    }

    fn mmap(&self, index: u32, offset: u64, size: u64) -> io::Result<MmapArea> {
        let region = self.region(index).ok_or(io::ErrorKind::NotFound)?;
        if offset.checked_add(size).is_none_or(|end| end > region.size) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        MmapArea::anonymous(size)
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.0
            .lock()
            .unwrap()
            .irq_counts
            .get(&index)
            .copied()
            .unwrap_or(0)
    }

    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        if fds.is_empty() || fds.len() > self.irq_count(index) as usize {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut s = self.0.lock().unwrap();
        let others = [
            VFIO_PCI_INTX_IRQ_INDEX,
            VFIO_PCI_MSI_IRQ_INDEX,
            VFIO_PCI_MSIX_IRQ_INDEX,
        ];
        if others.contains(&index)
            && others
                .iter()
                .any(|o| *o != index && s.enabled.contains_key(o))
        {
            // VFIO allows one of INTx, MSI, MSI-X at a time.
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if s.enabled.contains_key(&index) && !s.resizable.contains(&index) {
            // A NORESIZE index must be disabled before it is enabled with another count.
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        s.enabled.insert(index, fds.len());
        *s.enables.entry(index).or_default() += 1;
        let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
        s.triggers.insert(index, (0..count).collect());
        Ok(())
    }

    fn irq_resizable(&self, index: u32) -> bool {
        self.0.lock().unwrap().resizable.contains(&index)
    }

    fn set_irq_trigger(&self, index: u32, vector: u32, _fd: &EventFd) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        let available = s.irq_counts.get(&index).copied().unwrap_or(0);
        if !s.enabled.contains_key(&index) || vector >= available {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if !s.resizable.contains(&index) && vector as usize >= s.enabled[&index] {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        s.triggers.entry(index).or_default().insert(vector);
        Ok(())
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.enabled.remove(&index);
        s.triggers.remove(&index);
        Ok(())
    }

    fn set_intx_resample(&self, _fd: &EventFd) -> io::Result<()> {
        Ok(())
    }

    fn reset(&self) {
        self.0.lock().unwrap().resets += 1;
    }

    fn can_reset(&self) -> bool {
        true
    }
}

/// What the fake router was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouterOp {
    /// `allocate_gsi` returned this GSI.
    Allocate(u32),
    /// `set_msi_route(gsi, message)`.
    Route(u32, MsiMessage),
    /// `free_gsi(gsi)`.
    Free(u32),
    /// `add_irqfd(gsi, _)`.
    AddIrqfd(u32),
    /// `add_resample_irqfd(gsi, _, _)`.
    AddResampleIrqfd(u32),
    /// `remove_irqfd(gsi, _)`.
    RemoveIrqfd(u32),
}

#[derive(Default)]
struct RouterState {
    ops: Vec<RouterOp>,
    next: u32,
    live: Vec<u32>,
    fail_allocation: bool,
}

/// A fake interrupt router recording its calls.
#[derive(Default)]
pub struct FakeRouter(Mutex<RouterState>);

impl FakeRouter {
    /// Every call so far, in order.
    pub fn ops(&self) -> Vec<RouterOp> {
        self.0.lock().unwrap().ops.clone()
    }

    /// The GSIs allocated and not freed yet.
    pub fn live_gsis(&self) -> Vec<u32> {
        self.0.lock().unwrap().live.clone()
    }

    /// Makes every later GSI allocation fail.
    pub fn fail_allocation(&self) {
        self.0.lock().unwrap().fail_allocation = true;
    }

    /// The last MSI route set for `gsi`.
    pub fn route(&self, gsi: u32) -> Option<MsiMessage> {
        self.ops().iter().rev().find_map(|op| match op {
            RouterOp::Route(g, msg) if *g == gsi => Some(*msg),
            _ => None,
        })
    }
}

impl InterruptRouter for FakeRouter {
    fn allocate_gsi(&self) -> io::Result<u32> {
        let mut s = self.0.lock().unwrap();
        if s.fail_allocation {
            return Err(io::Error::other("no GSI left"));
        }
        let gsi = s.next;
        s.next += 1;
        s.live.push(gsi);
        s.ops.push(RouterOp::Allocate(gsi));
        Ok(gsi)
    }

    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
        self.0.lock().unwrap().ops.push(RouterOp::Route(gsi, msg));
        Ok(())
    }

    fn free_gsi(&self, gsi: u32) {
        let mut s = self.0.lock().unwrap();
        s.live.retain(|g| *g != gsi);
        s.ops.push(RouterOp::Free(gsi));
    }

    fn add_irqfd(&self, gsi: u32, _fd: &EventFd) -> io::Result<()> {
        self.0.lock().unwrap().ops.push(RouterOp::AddIrqfd(gsi));
        Ok(())
    }

    fn add_resample_irqfd(&self, gsi: u32, _fd: &EventFd, _resample: &EventFd) -> io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .ops
            .push(RouterOp::AddResampleIrqfd(gsi));
        Ok(())
    }

    fn remove_irqfd(&self, gsi: u32, _fd: &EventFd) -> io::Result<()> {
        self.0.lock().unwrap().ops.push(RouterOp::RemoveIrqfd(gsi));
        Ok(())
    }
}

/// What the fake guest address space was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// `map_direct(gpa, size, _)`.
    Map(u64, u64),
    /// `unmap_direct` of the slot at this guest address.
    Unmap(u64),
    /// `add_trapped(_, gpa, len, _)`.
    Trap(u64, u64),
    /// `remove_trapped(_, gpa)`.
    Untrap(u64),
}

#[derive(Default)]
struct MmioState {
    ops: Vec<MmioOp>,
    slots: HashMap<u32, u64>,
    next: u32,
    traps: Vec<u64>,
    fail_traps: bool,
}

/// A fake guest address space: slots are recorded, trapped ranges go on a real [`Bus`].
#[derive(Default)]
pub struct FakeMmio {
    state: Mutex<MmioState>,
    bus: Bus,
    pio: Bus,
}

impl FakeMmio {
    /// Every call so far, in order.
    pub fn ops(&self) -> Vec<MmioOp> {
        self.state.lock().unwrap().ops.clone()
    }

    /// Guest addresses of the memory slots mapped and not unmapped yet.
    pub fn live_slots(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.state.lock().unwrap().slots.values().copied().collect();
        v.sort_unstable();
        v
    }

    /// Guest addresses of the trapped ranges added and not removed yet.
    pub fn live_traps(&self) -> Vec<u64> {
        self.state.lock().unwrap().traps.clone()
    }

    /// Makes every later trapped-range registration fail.
    pub fn fail_traps(&self) {
        self.state.lock().unwrap().fail_traps = true;
    }

    /// A guest MMIO read at `addr` through the trapped ranges; false when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.bus.read(addr, data)
    }

    /// A guest MMIO write at `addr` through the trapped ranges; false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.bus.write(addr, data)
    }

    /// A guest port read at `addr` through the trapped ranges; false when nothing is there.
    pub fn pio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.pio.read(addr, data)
    }
}

impl GuestMmio for FakeMmio {
    unsafe fn map_direct(&self, gpa: u64, size: u64, _host_addr: u64) -> io::Result<SlotId> {
        let mut s = self.state.lock().unwrap();
        let id = s.next;
        s.next += 1;
        s.slots.insert(id, gpa);
        s.ops.push(MmioOp::Map(gpa, size));
        Ok(SlotId(id))
    }

    fn unmap_direct(&self, slot: SlotId) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        let gpa = s.slots.remove(&slot.0).ok_or(io::ErrorKind::NotFound)?;
        s.ops.push(MmioOp::Unmap(gpa));
        Ok(())
    }

    fn add_trapped(
        &self,
        space: AddressSpace,
        gpa: u64,
        len: u64,
        device: &SharedBusDevice,
    ) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if s.fail_traps {
            return Err(io::Error::other("bus full"));
        }
        let bus = if space == AddressSpace::Mmio {
            &self.bus
        } else {
            &self.pio
        };
        bus.insert(device, gpa, len).map_err(io::Error::other)?;
        s.traps.push(gpa);
        s.ops.push(MmioOp::Trap(gpa, len));
        Ok(())
    }

    fn remove_trapped(&self, space: AddressSpace, gpa: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        let bus = if space == AddressSpace::Mmio {
            &self.bus
        } else {
            &self.pio
        };
        bus.remove(gpa).map_err(io::Error::other)?;
        s.traps.retain(|g| *g != gpa);
        s.ops.push(MmioOp::Untrap(gpa));
        Ok(())
    }
}
