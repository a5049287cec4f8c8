use super::*;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Map(u64, u64, u64),
    Unmap(u64, u64),
}

#[derive(Default)]
struct FakeIommu {
    ops: Mutex<Vec<Op>>,
    fail_map_at: Option<u64>,
}

impl IommuBackend for Arc<FakeIommu> {
    unsafe fn map_dma(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        if self.fail_map_at == Some(iova) {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        self.ops
            .lock()
            .unwrap()
            .push(Op::Map(iova, size, host_addr));
        Ok(())
    }

    fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<()> {
        self.ops.lock().unwrap().push(Op::Unmap(iova, size));
        Ok(())
    }

    fn info(&self) -> io::Result<IommuInfo> {
        Ok(IommuInfo::default())
    }

    fn open_device_with_group(
        &self,
        sysfs_path: &Path,
        _group: Option<OwnedFd>,
    ) -> std::result::Result<VfioDevice, VfioError> {
        Err(VfioError::DeviceName {
            device: sysfs_path.display().to_string(),
        })
    }

    fn attached_groups(&self) -> usize {
        0
    }
}

fn container(fake: FakeIommu) -> (Arc<FakeIommu>, Arc<Container>) {
    let fake = Arc::new(fake);
    (fake.clone(), Container::new(Box::new(fake)))
}

#[test]
fn ram_is_mapped_when_the_first_device_attaches() {
    let (fake, c) = container(FakeIommu::default());
    // SAFETY: the fake backend never touches the memory.
    unsafe { c.map_guest_ram(0, 0x1000_0000, 0x7f00_0000_0000).unwrap() };
    assert!(fake.ops.lock().unwrap().is_empty());
    let _a = c.attach().unwrap();
    assert_eq!(
        *fake.ops.lock().unwrap(),
        [Op::Map(0, 0x1000_0000, 0x7f00_0000_0000)]
    );
}

#[test]
fn ram_registered_while_attached_is_mapped_at_once() {
    let (fake, c) = container(FakeIommu::default());
    let _a = c.attach().unwrap();
    // SAFETY: the fake backend never touches the memory.
    unsafe { c.map_guest_ram(0x1_0000_0000, 0x1000, 0x1000).unwrap() };
    assert_eq!(
        *fake.ops.lock().unwrap(),
        [Op::Map(0x1_0000_0000, 0x1000, 0x1000)]
    );
}

#[test]
fn ram_is_remapped_after_the_last_device_left() {
    let (fake, c) = container(FakeIommu::default());
    // SAFETY: the fake backend never touches the memory.
    unsafe { c.map_guest_ram(0, 0x1000, 0x1000).unwrap() };
    let a = c.attach().unwrap();
    let b = c.attach().unwrap();
    drop(a);
    drop(b);
    assert_eq!(c.attached_devices(), 0);
    let _c = c.attach().unwrap();
    assert_eq!(fake.ops.lock().unwrap().len(), 2);
}

#[test]
fn second_device_does_not_map_again() {
    let (fake, c) = container(FakeIommu::default());
    // SAFETY: the fake backend never touches the memory.
    unsafe { c.map_guest_ram(0, 0x1000, 0x1000).unwrap() };
    let _a = c.attach().unwrap();
    let _b = c.attach().unwrap();
    assert_eq!(fake.ops.lock().unwrap().len(), 1);
}

#[test]
fn overlapping_ram_is_refused() {
    let (_fake, c) = container(FakeIommu::default());
    // SAFETY: the fake backend never touches the memory.
    unsafe { c.map_guest_ram(0x1000, 0x2000, 0x1000).unwrap() };
    // SAFETY: as above.
    let err = unsafe { c.map_guest_ram(0x2000, 0x1000, 0x9000) }.unwrap_err();
    assert!(matches!(err, ContainerError::Overlap { other: 0x1000, .. }));
}

#[test]
fn empty_or_wrapping_ram_is_refused() {
    let (_fake, c) = container(FakeIommu::default());
    // SAFETY: the fake backend never touches the memory.
    let err = unsafe { c.map_guest_ram(0, 0, 0x1000) }.unwrap_err();
    assert!(matches!(err, ContainerError::InvalidRegion { .. }));
    // SAFETY: as above.
    let err = unsafe { c.map_guest_ram(u64::MAX, 2, 0x1000) }.unwrap_err();
    assert!(matches!(err, ContainerError::InvalidRegion { .. }));
}

#[test]
fn unmapping_while_attached_reaches_the_iommu() {
    let (fake, c) = container(FakeIommu::default());
    // SAFETY: the fake backend never touches the memory.
    unsafe { c.map_guest_ram(0, 0x1000, 0x1000).unwrap() };
    let _a = c.attach().unwrap();
    c.unmap_guest_ram(0).unwrap();
    assert_eq!(fake.ops.lock().unwrap().last(), Some(&Op::Unmap(0, 0x1000)));
    assert!(matches!(
        c.unmap_guest_ram(0),
        Err(ContainerError::NotRegistered { gpa: 0 })
    ));
}

#[test]
fn failed_mapping_undoes_the_regions_already_mapped() {
    let (fake, c) = container(FakeIommu {
        fail_map_at: Some(0x1_0000_0000),
        ..Default::default()
    });
    // SAFETY: the fake backend never touches the memory.
    unsafe {
        c.map_guest_ram(0, 0x1000, 0x1000).unwrap();
        c.map_guest_ram(0x1_0000_0000, 0x1000, 0x2000).unwrap();
    }
    assert!(matches!(
        c.attach(),
        Err(ContainerError::Map {
            gpa: 0x1_0000_0000,
            ..
        })
    ));
    assert_eq!(
        *fake.ops.lock().unwrap(),
        [Op::Map(0, 0x1000, 0x1000), Op::Unmap(0, 0x1000)]
    );
    assert_eq!(c.attached_devices(), 0);
}

fn info_buffer(caps: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 24];
    let flags = VFIO_IOMMU_INFO_PGSIZES
        | if caps.is_empty() {
            0
        } else {
            VFIO_IOMMU_INFO_CAPS
        };
    buf[0..4].copy_from_slice(&((24 + caps.len()) as u32).to_le_bytes());
    buf[4..8].copy_from_slice(&flags.to_le_bytes());
    buf[8..16].copy_from_slice(&0x4020_1000u64.to_le_bytes());
    if !caps.is_empty() {
        buf[16..20].copy_from_slice(&24u32.to_le_bytes());
    }
    buf.extend_from_slice(caps);
    buf
}

fn iova_cap(ranges: &[(u64, u64)], claimed: u32) -> Vec<u8> {
    let mut cap = Vec::new();
    cap.extend_from_slice(&(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16).to_le_bytes());
    cap.extend_from_slice(&1u16.to_le_bytes());
    cap.extend_from_slice(&0u32.to_le_bytes());
    cap.extend_from_slice(&claimed.to_le_bytes());
    cap.extend_from_slice(&0u32.to_le_bytes());
    for &(start, end) in ranges {
        cap.extend_from_slice(&start.to_le_bytes());
        cap.extend_from_slice(&end.to_le_bytes());
    }
    cap
}

#[test]
fn iova_ranges_are_parsed_from_the_capability_chain() {
    let buf = info_buffer(&iova_cap(
        &[(0, 0xfedf_ffff), (0xfef0_0000, 0xff_ffff_ffff)],
        2,
    ));
    let info = parse_iommu_info(&buf);
    assert_eq!(info.page_sizes, 0x4020_1000);
    assert_eq!(
        info.iova_ranges,
        Some(vec![
            IovaRange {
                start: 0,
                end: 0xfedf_ffff
            },
            IovaRange {
                start: 0xfef0_0000,
                end: 0xff_ffff_ffff
            },
        ])
    );
}

#[test]
fn truncated_iova_capability_yields_the_complete_ranges() {
    let buf = info_buffer(&iova_cap(&[(0, 0xffff)], 1000));
    assert_eq!(
        parse_iommu_info(&buf).iova_ranges,
        Some(vec![IovaRange {
            start: 0,
            end: 0xffff
        }])
    );
}

#[test]
fn looping_capability_chain_terminates() {
    let mut cap = iova_cap(&[(0, 0xffff)], 1);
    cap[4..8].copy_from_slice(&24u32.to_le_bytes());
    let info = parse_iommu_info(&info_buffer(&cap));
    assert!(info.iova_ranges.is_some());
}

#[test]
fn info_without_capabilities_has_no_ranges() {
    assert_eq!(parse_iommu_info(&info_buffer(&[])).iova_ranges, None);
    assert_eq!(parse_iommu_info(&[]), IommuInfo::default());
}

#[test]
fn mapped_bytes_count_registered_ram_only_while_a_device_is_attached() {
    let (_fake, c) = container(FakeIommu::default());
    // SAFETY: the fake backend never touches the memory.
    unsafe { c.map_guest_ram(0, 0x1000, 0x1000).unwrap() };
    // SAFETY: as above.
    unsafe { c.map_guest_ram(0x1_0000_0000, 0x3000, 0x9000).unwrap() };
    assert_eq!(c.mapped_bytes(), 0);

    let a = c.attach().unwrap();
    assert_eq!(c.mapped_bytes(), 0x4000);

    drop(a);
    assert_eq!(c.mapped_bytes(), 0);
}
