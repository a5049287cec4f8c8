use super::*;
use crate::testing::{get32, put32, FakeDevice};

fn setup() -> (FakeDevice, VirtualConfig, Interrupts) {
    let dev = FakeDevice::nvme_like();
    let cfg = VirtualConfig::new(&dev, [0x4000, 0, 0x1000, 0, 0x20, 0], 0x10000, true).unwrap();
    let irqs = Interrupts::new(Some(5), &dev).unwrap();
    (dev, cfg, irqs)
}

/// The whole config space as the guest reads it.
fn guest_view(cfg: &mut VirtualConfig, dev: &FakeDevice, irqs: &Interrupts) -> Vec<u8> {
    (0..cfg.len())
        .flat_map(|reg| cfg.read(reg, dev, irqs).to_le_bytes())
        .collect()
}

fn write32(cfg: &mut VirtualConfig, dev: &FakeDevice, offset: usize, value: u32) -> ConfigWrite {
    cfg.write(offset / 4, 0, &value.to_le_bytes(), dev)
}

#[test]
fn virtual_chain_keeps_msi_msix_and_pcie() {
    let (dev, mut cfg, irqs) = setup();
    let ids: Vec<u8> = caps::walk(&guest_view(&mut cfg, &dev, &irqs))
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, [caps::CAP_ID_PM, CAP_ID_MSI, CAP_ID_EXP, CAP_ID_MSIX]);
}

#[test]
fn virtual_extended_chain_hides_sriov_ari_and_rebar() {
    let (dev, mut cfg, irqs) = setup();
    let ids: Vec<u16> = caps::walk_ext(&guest_view(&mut cfg, &dev, &irqs))
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, [0x0001, 0x0003]);
}

#[test]
fn hidden_capability_body_reads_zero() {
    let (dev, mut cfg, irqs) = setup();
    assert_eq!(cfg.read(0x150 / 4, &dev, &irqs), 0);
    assert_eq!(cfg.read(0xc0 / 4, &dev, &irqs), 0);
}

#[test]
fn write_to_a_hidden_capability_is_dropped() {
    let (dev, mut cfg, _irqs) = setup();
    write32(&mut cfg, &dev, 0x148, 0x1);
    assert!(dev.config_writes().is_empty());
}

#[test]
fn multifunction_bit_is_hidden() {
    let (dev, mut cfg, irqs) = setup();
    assert_eq!((cfg.read(3, &dev, &irqs) >> 16) & 0xff, 0);
}

#[test]
fn identity_registers_are_read_only() {
    let (dev, mut cfg, irqs) = setup();
    write32(&mut cfg, &dev, 0, 0xffff_ffff);
    assert_eq!(cfg.read(0, &dev, &irqs), 0x10ca_8086);
    assert!(dev.config_writes().is_empty());
}

#[test]
fn flr_is_advertised_when_vfio_can_reset_the_device() {
    let (dev, mut cfg, irqs) = setup();
    assert_ne!(cfg.read((0x70 + 4) / 4, &dev, &irqs) & (1 << 28), 0);
}

#[test]
fn initiate_flr_never_reaches_the_device_and_is_reported() {
    let (dev, mut cfg, _irqs) = setup();
    let w = cfg.write((0x70 + 8) / 4, 0, &0x8000u16.to_le_bytes(), &dev);
    assert!(w.flr);
    let cfg_bytes = dev.config();
    assert_eq!(get32(&cfg_bytes, 0x78) & 0x8000, 0);
    // Other Device Control writes are not an FLR.
    let w = cfg.write((0x70 + 8) / 4, 0, &0x0010u16.to_le_bytes(), &dev);
    assert!(!w.flr);
    let w = cfg.write((0x70 + 8) / 4, 2, &0xffffu16.to_le_bytes(), &dev);
    assert!(!w.flr);
}

#[test]
fn max_payload_size_keeps_the_host_value() {
    let (dev, mut cfg, _irqs) = setup();
    // Guest asks for MPS 4096 (0b101) and relaxed ordering (bit 4).
    cfg.write((0x70 + 8) / 4, 0, &0x00b0u16.to_le_bytes(), &dev);
    assert_eq!(get32(&dev.config(), 0x78) & 0xf0, 0x30);
}

#[test]
fn link_disable_and_retrain_are_filtered() {
    let (dev, mut cfg, _irqs) = setup();
    cfg.write((0x70 + 0x10) / 4, 0, &0x0070u16.to_le_bytes(), &dev);
    // Common clock (bit 6) passes; ASPM keeps the host's L1 (bit 1 clear here, bit 6 set).
    assert_eq!(get32(&dev.config(), 0x80) & 0xff, 0x40);
}

#[test]
fn device_status_write_one_to_clear_passes_through() {
    let (dev, mut cfg, _irqs) = setup();
    cfg.write((0x70 + 8) / 4, 2, &0x000fu16.to_le_bytes(), &dev);
    assert_eq!(dev.config_writes(), [(0x7a, vec![0x0f, 0])]);
}

#[test]
fn command_write_reaches_the_device_and_is_reported() {
    let (dev, mut cfg, _irqs) = setup();
    let w = cfg.write(1, 0, &0x0006u16.to_le_bytes(), &dev);
    assert!(w.command);
    assert_eq!(cfg.command(), 0x6);
    assert_eq!(dev.config_writes(), [(4, vec![6, 0])]);
}

#[test]
fn status_byte_write_does_not_touch_command() {
    let (dev, mut cfg, _irqs) = setup();
    let w = cfg.write(1, 3, &[0x80], &dev);
    assert!(!w.command);
    assert_eq!(dev.config_writes(), [(7, vec![0x80])]);
}

#[test]
fn bar_writes_stay_virtual() {
    let (dev, mut cfg, irqs) = setup();
    let w = write32(&mut cfg, &dev, 0x10, 0xffff_ffff);
    assert!(w.bars);
    assert_eq!(cfg.read(4, &dev, &irqs), 0xffff_c004);
    assert!(dev.config_writes().is_empty());
}

#[test]
fn rom_bar_sizes_from_the_rom_region() {
    let (dev, mut cfg, irqs) = setup();
    write32(&mut cfg, &dev, 0x30, 0xffff_f800);
    assert_eq!(cfg.read(12, &dev, &irqs), 0xffff_0000);
}

#[test]
fn msi_writes_stay_virtual() {
    let (dev, mut cfg, irqs) = setup();
    let w = cfg.write(0x50 / 4, 2, &[0x01, 0x00], &dev);
    assert_eq!(w.msi, MsiWrite::Control);
    assert!(dev.config_writes().is_empty());
    assert_eq!(cfg.read(0x50 / 4, &dev, &irqs) >> 16 & 1, 1);
    assert_eq!(get32(&dev.config(), 0x50) >> 16 & 1, 0);
}

#[test]
fn msix_enable_stays_virtual_and_is_reported() {
    let (dev, mut cfg, irqs) = setup();
    let w = cfg.write(0xb0 / 4, 2, &0x8000u16.to_le_bytes(), &dev);
    assert_eq!(w.msix, MsixWrite::Control);
    assert!(dev.config_writes().is_empty());
    assert_eq!(cfg.read(0xb0 / 4, &dev, &irqs) >> 16, 0x800f);
}

#[test]
fn capability_headers_read_relinked_pointers() {
    let (dev, mut cfg, irqs) = setup();
    // MSI-X at 0xb0 was followed by the hidden AF capability: its next pointer now ends the list.
    assert_eq!(cfg.read(0xb0 / 4, &dev, &irqs) & 0xffff, 0x0011);
}

#[test]
fn register_past_the_config_space_reads_zero() {
    let (dev, mut cfg, irqs) = setup();
    assert_eq!(cfg.read(1024, &dev, &irqs), 0);
    assert_eq!(cfg.read(usize::MAX, &dev, &irqs), 0);
    assert_eq!(cfg.write(usize::MAX, 0, &[1], &dev), ConfigWrite::NONE);
}

#[test]
fn malformed_write_is_ignored() {
    let (dev, mut cfg, _irqs) = setup();
    cfg.write(1, 3, &[1, 2], &dev);
    cfg.write(1, 0, &[1, 2, 3], &dev);
    cfg.write(1, u64::MAX, &[1], &dev);
    assert!(dev.config_writes().is_empty());
}

#[test]
fn interrupt_line_is_a_scratch_register() {
    let (dev, mut cfg, irqs) = setup();
    cfg.write(15, 0, &[11], &dev);
    assert_eq!(cfg.read(15, &dev, &irqs) & 0xffff, 0x010b);
    assert!(dev.config_writes().is_empty());
}

#[test]
fn interrupt_pin_is_zero_without_intx() {
    let dev = FakeDevice::nvme_like();
    let mut cfg = VirtualConfig::new(&dev, [0; 6], 0, false).unwrap();
    let irqs = Interrupts::new(None, &dev).unwrap();
    assert_eq!((cfg.read(15, &dev, &irqs) >> 8) & 0xff, 0);
}

#[test]
fn bridge_is_refused() {
    let dev = FakeDevice::new();
    dev.with_config(|c| c[0x0e] = 0x01);
    let err = VirtualConfig::new(&dev, [0; 6], 0, false).err().unwrap();
    assert!(matches!(err, ConfigError::NotEndpoint { header_type: 1 }));
}

#[test]
fn passthrough_registers_read_live() {
    let (dev, mut cfg, irqs) = setup();
    // The Device Serial Number capability's first dword.
    dev.with_config(|c| put32(c, 0x200 + 4, 0x1234_5678));
    assert_eq!(cfg.read((0x200 + 4) / 4, &dev, &irqs), 0x1234_5678);
}

#[test]
fn aer_registers_are_virtual() {
    let (dev, mut cfg, irqs) = setup();
    dev.with_config(|c| put32(c, 0x100 + 8, 0x1234_5678));
    assert_eq!(
        cfg.read((0x100 + 8) / 4, &dev, &irqs),
        rvmm_pci::aer::UNCOR_MASK_DEFAULT
    );
    write32(&mut cfg, &dev, 0x100 + 0x0c, 0);
    assert!(dev.config_writes().is_empty());
}
