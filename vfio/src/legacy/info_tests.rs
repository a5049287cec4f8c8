use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
};

use super::*;

const FLAGS: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP;

/// A region info of region 0 (size 0x4000 at offset 0x10000) followed by `caps`.
fn region_buffer(caps: &[u8]) -> Vec<u8> {
    let flags = FLAGS
        | if caps.is_empty() {
            0
        } else {
            VFIO_REGION_INFO_FLAG_CAPS
        };
    let mut buf = Vec::new();
    buf.extend_from_slice(&((32 + caps.len()) as u32).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&(if caps.is_empty() { 0u32 } else { 32 }).to_ne_bytes());
    buf.extend_from_slice(&0x4000u64.to_ne_bytes());
    buf.extend_from_slice(&0x10000u64.to_ne_bytes());
    buf.extend_from_slice(caps);
    buf
}

/// A capability header with `id` and `next`, then `body`.
fn cap(id: u16, next: u32, body: &[u8]) -> Vec<u8> {
    let mut cap = Vec::new();
    cap.extend_from_slice(&id.to_ne_bytes());
    cap.extend_from_slice(&1u16.to_ne_bytes());
    cap.extend_from_slice(&next.to_ne_bytes());
    cap.extend_from_slice(body);
    cap
}

fn sparse_body(areas: &[(u64, u64)], claimed: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&claimed.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    for &(offset, size) in areas {
        body.extend_from_slice(&offset.to_ne_bytes());
        body.extend_from_slice(&size.to_ne_bytes());
    }
    body
}

const SPARSE: u16 = VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16;

#[test]
fn region_without_capabilities_has_no_sparse_areas() {
    let region = parse_region_info(&region_buffer(&[])).unwrap();
    assert_eq!(
        region,
        RegionRaw {
            flags: FLAGS,
            size: 0x4000,
            offset: 0x10000,
            sparse: None
        }
    );
}

#[test]
fn sparse_mmap_areas_are_parsed() {
    let caps = cap(SPARSE, 0, &sparse_body(&[(0, 0x1000), (0x3000, 0x1000)], 2));
    let region = parse_region_info(&region_buffer(&caps)).unwrap();
    assert_eq!(
        region.sparse,
        Some(vec![Area::new(0, 0x1000), Area::new(0x3000, 0x1000)])
    );
}

#[test]
fn sparse_mmap_after_another_capability_is_found() {
    let mut caps = cap(2, 32 + 16, &[0u8; 8]);
    caps.extend(cap(SPARSE, 0, &sparse_body(&[(0x2000, 0x2000)], 1)));
    let region = parse_region_info(&region_buffer(&caps)).unwrap();
    assert_eq!(region.sparse, Some(vec![Area::new(0x2000, 0x2000)]));
}

#[test]
fn truncated_sparse_areas_yield_the_complete_ones() {
    let mut caps = cap(SPARSE, 0, &sparse_body(&[(0, 0x1000)], 1000));
    caps.extend_from_slice(&[0u8; 12]);
    let region = parse_region_info(&region_buffer(&caps)).unwrap();
    assert_eq!(region.sparse, Some(vec![Area::new(0, 0x1000)]));
}

#[test]
fn looping_region_capability_chain_terminates() {
    let caps = cap(SPARSE, 32, &sparse_body(&[(0, 0x1000)], 1));
    let region = parse_region_info(&region_buffer(&caps)).unwrap();
    assert_eq!(region.sparse, Some(vec![Area::new(0, 0x1000)]));
}

#[test]
fn capability_offset_past_the_buffer_is_ignored() {
    let mut buf = region_buffer(&cap(SPARSE, 0, &sparse_body(&[], 0)));
    buf[12..16].copy_from_slice(&0xffff_fff0u32.to_ne_bytes());
    assert_eq!(parse_region_info(&buf).unwrap().sparse, None);
}

#[test]
fn capability_offset_inside_the_header_is_ignored() {
    let mut buf = region_buffer(&cap(SPARSE, 0, &sparse_body(&[], 0)));
    buf[12..16].copy_from_slice(&8u32.to_ne_bytes());
    assert_eq!(parse_region_info(&buf).unwrap().sparse, None);
}

#[test]
fn truncated_region_info_is_refused() {
    assert_eq!(parse_region_info(&region_buffer(&[])[..31]), None);
}

#[test]
fn region_info_asking_for_more_space_is_grown() {
    let mut buf = region_buffer(&[]);
    buf[0..4].copy_from_slice(&0x100u32.to_ne_bytes());
    assert_eq!(region_info_needs(&buf), Some(0x100));
}

#[test]
fn region_info_asking_for_absurd_space_is_not_grown() {
    let mut buf = region_buffer(&[]);
    buf[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert_eq!(region_info_needs(&buf), None);
}

#[test]
fn region_info_that_fits_is_not_grown() {
    assert_eq!(region_info_needs(&region_buffer(&[])), None);
}

fn device(flags: u32, regions: u32, irqs: u32) -> vfio_device_info {
    vfio_device_info {
        argsz: 24,
        flags,
        num_regions: regions,
        num_irqs: irqs,
        ..Default::default()
    }
}

#[test]
fn pci_device_info_is_decoded_with_its_reset_flag() {
    let info = parse_device_info(&device(
        VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
        9,
        5,
    ));
    assert_eq!(
        info,
        Some(DeviceInfo {
            reset: true,
            regions: 9,
            irqs: 5
        })
    );
}

#[test]
fn device_without_reset_flag_has_no_reset() {
    let info = parse_device_info(&device(VFIO_DEVICE_FLAGS_PCI, 9, 5)).unwrap();
    assert!(!info.reset);
}

#[test]
fn non_pci_device_is_refused() {
    assert_eq!(
        parse_device_info(&device(VFIO_DEVICE_FLAGS_RESET, 9, 5)),
        None
    );
}

#[test]
fn pci_device_without_config_region_is_refused() {
    assert_eq!(
        parse_device_info(&device(VFIO_DEVICE_FLAGS_PCI, 7, 5)),
        None
    );
}

#[test]
fn huge_region_and_irq_counts_are_clamped() {
    let info = parse_device_info(&device(VFIO_DEVICE_FLAGS_PCI, u32::MAX, u32::MAX)).unwrap();
    assert_eq!((info.regions, info.irqs), (MAX_REGIONS, MAX_IRQS));
}

fn irq(flags: u32, index: u32, count: u32) -> vfio_irq_info {
    vfio_irq_info {
        argsz: 16,
        flags,
        index,
        count,
    }
}

#[test]
fn intx_irq_info_is_decoded() {
    let flags = VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED;
    assert_eq!(
        parse_irq_info(&irq(flags, 0, 1), 0),
        IrqInfo {
            count: 1,
            maskable: true,
            automasked: true,
            noresize: false
        }
    );
}

#[test]
fn irq_without_eventfd_support_has_no_interrupts() {
    assert_eq!(parse_irq_info(&irq(0, 2, 32), 2).count, 0);
}

#[test]
fn irq_info_about_another_index_has_no_interrupts() {
    assert_eq!(
        parse_irq_info(&irq(VFIO_IRQ_INFO_EVENTFD, 1, 4), 2).count,
        0
    );
}

fn bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

#[test]
fn irq_set_carries_header_and_eventfds() {
    let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    let buf = bytes(&encode_irq_set(flags, 2, 0, 3, &[10, 11, 12]));
    assert_eq!(buf.len(), 32);
    assert_eq!(read::<4>(&buf, 0), Some(32));
    assert_eq!(read::<4>(&buf, 4), Some(u64::from(flags)));
    assert_eq!(read::<4>(&buf, 8), Some(2));
    assert_eq!(read::<4>(&buf, 16), Some(3));
    assert_eq!(
        [
            read::<4>(&buf, 20),
            read::<4>(&buf, 24),
            read::<4>(&buf, 28)
        ],
        [Some(10), Some(11), Some(12)]
    );
}

#[test]
fn irq_set_without_data_has_the_bare_header_size() {
    let buf = bytes(&encode_irq_set(0, 1, 0, 0, &[]));
    assert_eq!(read::<4>(&buf, 0), Some(20));
    assert_eq!(buf.len(), 24);
}
