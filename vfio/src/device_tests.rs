use vfio_bindings::bindings::vfio::{
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};

use super::*;
use crate::testing::{get32, FakeDevice, FakeMmio, FakeRouter, MmioOp, RouterOp};

const BAR0: u64 = 0xe000_0000;
const BAR2: u64 = 0xe001_0000;
const IO4: u64 = 0xc000;
const ROM: u64 = 0xe010_0000;

struct Rig {
    dev: FakeDevice,
    router: Arc<FakeRouter>,
    mmio: Arc<FakeMmio>,
    vfio: VfioPciDevice,
}

fn rig_with(dev: FakeDevice, intx_gsi: Option<u32>) -> Rig {
    let router = Arc::new(FakeRouter::default());
    let mmio = Arc::new(FakeMmio::default());
    let vfio = VfioPciDevice::with_backend(
        "0000:01:00.0".to_string(),
        Box::new(dev.clone()),
        DeviceConfig { intx_gsi },
        router.clone(),
        mmio.clone(),
    )
    .unwrap();
    Rig {
        dev,
        router,
        mmio,
        vfio,
    }
}

fn rig() -> Rig {
    rig_with(FakeDevice::nvme_like(), Some(20))
}

impl Rig {
    fn cfg_write(&mut self, offset: usize, data: &[u8]) {
        self.vfio
            .write_config_register(offset / 4, (offset % 4) as u64, data);
    }

    fn cfg_read(&mut self, offset: usize) -> u32 {
        self.vfio.read_config_register(offset / 4)
    }

    fn place_bars(&mut self) {
        self.vfio.set_bar_address(0, BAR0);
        self.vfio.set_bar_address(2, BAR2);
        self.vfio.set_bar_address(4, IO4);
    }

    fn enable_memory(&mut self) {
        self.cfg_write(4, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
    }

    fn table_write(&self, vector: u64, dword: u64, value: u32) {
        assert!(self.mmio.write(
            BAR0 + 0x2000 + vector * 16 + dword * 4,
            &value.to_le_bytes()
        ));
    }

    fn program_vector(&self, vector: u64, data: u32) {
        self.table_write(vector, 0, 0xfee0_0000);
        self.table_write(vector, 1, 0);
        self.table_write(vector, 2, data);
        self.table_write(vector, 3, 0);
    }

    fn enable_msix(&mut self, function_mask: bool) {
        let ctrl: u16 = 0x8000 | if function_mask { 0x4000 } else { 0 };
        self.cfg_write(0xb2, &ctrl.to_le_bytes());
    }
}

#[test]
fn attach_quiesces_the_device_without_a_reset_of_its_own() {
    // vfio-pci reset the device as its descriptor opened: another reset would only cost time.
    let dev = FakeDevice::nvme_like();
    dev.with_config(|c| c[4] = 0x07);
    let r = rig_with(dev, None);
    assert_eq!(r.dev.resets(), 0);
    assert_eq!(get32(&r.dev.config(), 4) & 0x7, 0);
}

#[test]
fn bars_are_reported_for_the_allocator() {
    let r = rig();
    let bars: Vec<(usize, u64)> = r.vfio.bars().iter().map(|b| (b.index, b.size)).collect();
    assert_eq!(bars, [(0, 0x4000), (2, 0x1000), (4, 0x20)]);
    assert_eq!(r.vfio.rom_size(), Some(0x10000));
}

#[test]
fn bars_are_placed_when_memory_decode_is_enabled() {
    let mut r = rig();
    r.place_bars();
    assert!(r.mmio.ops().is_empty());
    r.enable_memory();
    assert_eq!(
        r.mmio.ops(),
        [
            MmioOp::Map(BAR0, 0x2000),
            MmioOp::Trap(BAR0 + 0x2000, 0x2000),
            MmioOp::Map(BAR2, 0x1000),
        ]
    );
}

#[test]
fn disabling_memory_decode_removes_the_bars() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    r.cfg_write(4, &0u16.to_le_bytes());
    assert!(r.mmio.live_slots().is_empty());
    assert!(r.mmio.live_traps().is_empty());
    assert!(r.vfio.placed_bars().is_empty());
}

#[test]
fn relocating_a_bar_moves_its_mappings() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    r.cfg_write(0x18, &0xe800_0000u32.to_le_bytes());
    assert_eq!(r.mmio.live_slots(), [BAR0, 0xe800_0000]);
    assert!(r.vfio.placed_bars().contains(&(2, 0xe800_0000)));
}

#[test]
fn io_bar_is_trapped_on_the_pio_bus() {
    let mut r = rig();
    r.place_bars();
    r.cfg_write(4, &COMMAND_IO.to_le_bytes());
    assert_eq!(r.mmio.ops(), [MmioOp::Trap(IO4, 0x20)]);
    let mut data = [0u8; 4];
    assert!(r.mmio.pio_read(IO4 + 4, &mut data));
}

#[test]
fn rom_is_placed_when_enabled_and_is_read_only() {
    let mut r = rig();
    r.cfg_write(0x30, &(ROM as u32 | 1).to_le_bytes());
    r.enable_memory();
    assert!(r.vfio.placed_bars().contains(&(ROM_INDEX, ROM)));
    assert!(r.mmio.write(ROM + 8, &[0xaa; 4]));
    let mut data = [0xffu8; 4];
    assert!(r.mmio.read(ROM + 8, &mut data));
    assert_eq!(data, [0; 4]);
    assert!(r.dev.memory(ROM_INDEX as u32).iter().all(|b| *b == 0));
}

#[test]
fn trapped_access_outside_msix_reaches_the_device() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    assert!(r.mmio.write(BAR0 + 0x2800, &0x1234_5678u32.to_le_bytes()));
    assert_eq!(get32(&r.dev.memory(0), 0x2800), 0x1234_5678);
}

#[test]
fn msix_table_writes_never_reach_the_device() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    r.program_vector(0, 0x41);
    assert!(r.dev.memory(0)[0x2000..0x2010].iter().all(|b| *b == 0));
}

#[test]
fn enabling_msix_replaces_intx_and_routes_unmasked_vectors() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    assert_eq!(r.vfio.irq_mode(), IrqMode::Intx);
    r.program_vector(1, 0x4041);
    r.enable_msix(false);
    assert_eq!(r.vfio.irq_mode(), IrqMode::Msix(16));
    assert_eq!(r.dev.enabled_irq(VFIO_PCI_INTX_IRQ_INDEX), None);
    // Live on the host: vector 0 (from the enable) up to the unmasked vector 1, not all 16.
    assert_eq!(r.dev.enabled_irq(VFIO_PCI_MSIX_IRQ_INDEX), Some(2));
    assert_eq!(r.router.live_gsis().len(), 1);
    let gsi = r.router.live_gsis()[0];
    assert_eq!(r.router.route(gsi).map(|m| m.data), Some(0x4041));
}

#[test]
fn function_mask_keeps_vectors_unrouted_until_cleared() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    r.program_vector(0, 0x41);
    r.enable_msix(true);
    assert!(!r
        .router
        .ops()
        .iter()
        .any(|op| matches!(op, RouterOp::AddIrqfd(_))));
    r.enable_msix(false);
    assert!(r
        .router
        .ops()
        .iter()
        .any(|op| matches!(op, RouterOp::AddIrqfd(_))));
}

#[test]
fn masking_a_vector_in_the_table_removes_its_irqfd() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    r.enable_msix(false);
    r.program_vector(2, 0x42);
    r.table_write(2, 3, 1);
    assert!(matches!(
        r.router.ops().last(),
        Some(RouterOp::RemoveIrqfd(_))
    ));
}

#[test]
fn pba_shows_pending_masked_vectors() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    r.enable_msix(false);
    // Vector 3 used by the guest, then masked: the host interrupt stays pending.
    r.program_vector(3, 0x43);
    r.table_write(3, 3, 1);
    r.vfio.lock().irqs.signal_vector(3);
    let mut data = [0u8; 8];
    assert!(r.mmio.read(BAR0 + 0x3000, &mut data));
    assert_eq!(u64::from_le_bytes(data), 1 << 3);
}

#[test]
fn disabling_msix_returns_to_intx_and_frees_gsis() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    r.program_vector(0, 0x41);
    r.enable_msix(false);
    r.cfg_write(0xb2, &0u16.to_le_bytes());
    assert_eq!(r.vfio.irq_mode(), IrqMode::Intx);
    assert!(r.router.live_gsis().is_empty());
}

#[test]
fn guest_flr_resets_the_device_and_the_virtual_state() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    r.program_vector(0, 0x41);
    r.enable_msix(false);
    assert!(matches!(r.vfio.irq_mode(), IrqMode::Msix(_)));
    let resets = r.dev.resets();
    // Device Control (PCIe capability at 0x70): Initiate FLR.
    r.cfg_write(0x78, &0x8000u16.to_le_bytes());
    assert_eq!(r.dev.resets(), resets + 1);
    // As after a reset: MSI-X off (back to INTx), decode off, BARs out of the guest but at the
    // addresses they had (the guest restores its saved state).
    assert_eq!(r.vfio.irq_mode(), IrqMode::Intx);
    assert_eq!(r.cfg_read(0xb0) >> 16 & 0x8000, 0);
    assert_eq!(r.cfg_read(4) & 0x7, 0);
    assert!(r.mmio.live_slots().is_empty());
    assert_eq!(r.cfg_read(0x10) & !0xf, BAR0 as u32);
    r.enable_memory();
    assert!(!r.mmio.live_slots().is_empty());
}

#[test]
fn secondary_bus_reset_resets_the_device() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    let resets = r.dev.resets();
    r.vfio.reset();
    assert_eq!(r.dev.resets(), resets + 1);
    assert!(r.mmio.live_slots().is_empty());
}

#[test]
fn enabling_msi_routes_each_enabled_vector() {
    let mut r = rig_with(FakeDevice::nvme_like(), None);
    r.cfg_write(0x54, &0xfee0_0000u32.to_le_bytes());
    r.cfg_write(0x5c, &0x4060u32.to_le_bytes());
    r.cfg_write(0x52, &0x0021u16.to_le_bytes());
    assert_eq!(r.vfio.irq_mode(), IrqMode::Msi(4));
    assert_eq!(r.dev.enabled_irq(VFIO_PCI_MSI_IRQ_INDEX), Some(4));
    let data: Vec<u32> = r
        .router
        .live_gsis()
        .iter()
        .filter_map(|g| r.router.route(*g).map(|m| m.data))
        .collect();
    assert_eq!(data, [0x4060, 0x4061, 0x4062, 0x4063]);
}

#[test]
fn request_and_error_events_are_wired() {
    let r = rig();
    assert!(r.vfio.request_event().is_some());
    assert!(r.vfio.error_event().is_some());
    let dev = FakeDevice::nvme_like();
    dev.set_irq_count(VFIO_PCI_REQ_IRQ_INDEX, 0);
    assert!(rig_with(dev, None).vfio.request_event().is_none());
}

#[test]
fn release_tears_everything_down() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    r.program_vector(0, 0x41);
    r.enable_msix(false);
    r.vfio.release();
    assert!(r.mmio.live_slots().is_empty());
    assert!(r.mmio.live_traps().is_empty());
    assert!(r.router.live_gsis().is_empty());
    assert_eq!(r.dev.enabled_irq(VFIO_PCI_MSIX_IRQ_INDEX), None);
    assert_eq!(r.dev.enabled_irq(VFIO_PCI_REQ_IRQ_INDEX), None);
    assert_eq!(get32(&r.dev.config(), 4) & 0x7, 0);
    // Closed, and not reset by rvmm: vfio-pci resets it as its last descriptor closes.
    assert_eq!(r.dev.handles(), 1);
    assert_eq!(r.dev.resets(), 0);
    assert_eq!(r.cfg_read(0), u32::MAX);
}

#[test]
fn the_device_is_gone_for_the_guest_while_the_host_still_closes_it() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    let gate = r.dev.hold_close();
    // Should the release wait for the close under the device's lock, the checks below would
    // wait too: the gate opens by itself after a while, and the test fails instead of hanging.
    let _watchdog = {
        let gate = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(5));
            gate.open();
        })
    };
    let releaser = {
        let vfio = r.vfio.clone();
        std::thread::spawn(move || vfio.release())
    };
    // The close is held back; the guest's accesses must not wait for it.
    let started = std::time::Instant::now();
    while !r.vfio.is_released() {
        assert!(started.elapsed() < std::time::Duration::from_secs(4));
        std::thread::yield_now();
    }
    assert_eq!(r.cfg_read(0), u32::MAX);
    assert!(r.mmio.live_slots().is_empty());
    assert!(!releaser.is_finished(), "the close is still held back");
    gate.open();
    releaser.join().unwrap();
    assert_eq!(r.dev.handles(), 1);
}

#[test]
fn release_is_idempotent() {
    let r = rig();
    r.vfio.release();
    r.vfio.release();
    assert_eq!(r.dev.handles(), 1);
    assert_eq!(r.dev.resets(), 0);
    assert!(r.vfio.is_released());
}

#[test]
fn dropping_the_last_handle_releases() {
    let r = rig();
    let clone = r.vfio.clone();
    drop(r.vfio);
    assert_eq!(r.dev.handles(), 2);
    drop(clone);
    assert_eq!(r.dev.handles(), 1);
}

#[test]
fn trapped_access_after_release_is_ignored() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    let bus_device_gone = {
        r.vfio.release();
        let mut data = [0xffu8; 4];
        !r.mmio.read(BAR0 + 0x2000, &mut data)
    };
    assert!(bus_device_gone);
}

#[test]
fn arbitrary_config_accesses_do_not_panic() {
    let mut r = rig();
    r.place_bars();
    let values = [0u8, 0xff, 0x80, 0x01];
    for reg in (0..1030).chain([usize::MAX, usize::MAX / 4]) {
        let _ = r.vfio.read_config_register(reg);
        for offset in [0u64, 1, 2, 3, 4, u64::MAX] {
            for len in [0usize, 1, 2, 3, 4, 8] {
                let data: Vec<u8> = (0..len).map(|i| values[(reg % 4 + i) % 4]).collect();
                r.vfio.write_config_register(reg, offset, &data);
            }
        }
    }
}

#[test]
fn arbitrary_bar_accesses_do_not_panic() {
    let mut r = rig();
    r.place_bars();
    r.enable_memory();
    r.enable_msix(false);
    let mut inner = r.vfio.lock();
    for bar in [0usize, 1, 2, 4, 6, 7, usize::MAX] {
        for offset in [
            0u64,
            0x1fff,
            0x2000,
            0x20fc,
            0x2ffe,
            0x3000,
            0x3004,
            0x3fff,
            u64::MAX - 2,
        ] {
            for len in [1usize, 2, 3, 4, 8, 16] {
                let mut buf = vec![0x5au8; len];
                inner.trap_read(bar, offset, &mut buf);
                inner.trap_write(bar, offset, &buf);
            }
        }
    }
}

/// A guest address space that records the device's command register at each slot removal.
struct OrderMmio {
    inner: FakeMmio,
    dev: FakeDevice,
    command_at_unmap: Mutex<Vec<u32>>,
}

impl GuestMmio for OrderMmio {
    unsafe fn map_direct(
        &self,
        gpa: u64,
        size: u64,
        host_addr: u64,
    ) -> std::io::Result<crate::SlotId> {
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { self.inner.map_direct(gpa, size, host_addr) }
    }

    fn unmap_direct(&self, slot: crate::SlotId) -> std::io::Result<()> {
        let command = get32(&self.dev.config(), 4) & 0xffff;
        self.command_at_unmap.lock().unwrap().push(command);
        self.inner.unmap_direct(slot)
    }

    fn add_trapped(
        &self,
        space: AddressSpace,
        gpa: u64,
        len: u64,
        device: &rvmm_devices::SharedBusDevice,
    ) -> std::io::Result<()> {
        self.inner.add_trapped(space, gpa, len, device)
    }

    fn remove_trapped(&self, space: AddressSpace, gpa: u64) -> std::io::Result<()> {
        self.inner.remove_trapped(space, gpa)
    }
}

#[test]
fn bars_leave_the_guest_before_the_device_stops_decoding() {
    let dev = FakeDevice::nvme_like();
    let mmio = Arc::new(OrderMmio {
        inner: FakeMmio::default(),
        dev: dev.clone(),
        command_at_unmap: Mutex::new(Vec::new()),
    });
    let mut vfio = VfioPciDevice::with_backend(
        "0000:01:00.0".to_string(),
        Box::new(dev),
        DeviceConfig::default(),
        Arc::new(FakeRouter::default()),
        mmio.clone(),
    )
    .unwrap();
    vfio.set_bar_address(0, BAR0);
    vfio.write_config_register(1, 0, &COMMAND_MEMORY.to_le_bytes());
    vfio.write_config_register(1, 0, &0u16.to_le_bytes());
    let seen = mmio.command_at_unmap.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|c| c & u32::from(COMMAND_MEMORY) != 0));
}
